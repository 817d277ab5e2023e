"""One check for every numeric setting: the right type, finite, within its range.

The configs call `check_number` on each of their numeric fields, so the command line and the
Python API refuse the same values with the same message (naming the field in backticks,
which the command line words as its flag).
"""

from __future__ import annotations

import math
import numbers

from biounet.errors import BiounetError


def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    none_ok: bool = False,
) -> None:
    """Refuse `value` unless it is a real number (an integer where `integer`) in the range.

    ``low``/``high`` bound it, inclusive unless ``low_open``/``high_open``. A bool is not a
    number here; NaN and infinities never pass; None passes only with ``none_ok``.

    Raises
    ------
    BiounetError
        "`name` must be ..., not value".
    """
    if value is None and none_ok:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        what = "an integer" if integer else "a finite number"
        raise BiounetError(f"`{name}` must be {what}, not {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise BiounetError(
            f"`{name}` must be {_range(low, high, low_open, high_open)}, not {value}"
        )


def _range(low, high, low_open, high_open) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux MemAvailable), or None
    where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(need: int, available: int | None, what: str, fix: str) -> None:
    """Refuse a run whose estimated memory `need` exceeds what is `available`."""
    if available is not None and need > available:
        raise BiounetError(
            f"{what} needs about {need / 2**30:.1f} GiB but {available / 2**30:.1f} GiB are "
            f"free; {fix}"
        )
