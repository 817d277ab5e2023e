"""Writes that survive kills and power cuts, and what killed writers leave behind.

Every output goes to a temporary name in its folder and is renamed into place once complete
and flushed (`atomic_path`), so a final name always holds a complete file. Temporary names
carry the writer's host and process id, so the next run into a folder can remove a killed
writer's leftovers without touching a live writer's (`remove_leftovers`). `fault_point` marks
the places where the crash tests kill the process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from biounet.errors import BiounetError

# Temporary names carry the writer's host and process id: the next run into a folder removes
# what a killed writer on this host left (`remove_leftovers`) and never a live writer's files.
_LEFTOVER = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.(part|work|tmp)$")


def temp_prefix(name: str) -> str:
    """Prefix of a temporary file or folder for `name` (see `remove_leftovers`)."""
    return f".{name}.{socket.gethostname().split('.')[0]}-{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    The file is flushed to disk before the rename and the folder after it, so a power cut
    leaves the old file or the new one, never a torn one.
    """
    path = Path(path)
    ensure_dir(path.parent)
    # A dot-name ending in .part: never listed as an input if a kill leaves it behind.
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        fsync_file(Path(tmp))
        fault_point(f"rename {path.name}")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds.

    A folder there before (an earlier output) is replaced only then, by two renames: a kill
    at any instant leaves under `path` the old folder, the new one, or (between the renames)
    nothing, never a partial folder; what is left under temporary names `remove_leftovers`
    takes away.
    """
    path = Path(path).absolute()  # other processes (cluster workers) may write into it
    ensure_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".part", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        fault_point(f"rename {path.name}")
        old = None
        if path.exists():
            old = path.parent / f"{temp_prefix(path.name)}old.tmp"
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where folders can't sync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(folder: Path) -> int:
    """Remove the temporary files and folders that killed biounet writers on this host left
    in `folder` (their process is gone); returns how many. Nothing else is touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    host = socket.gethostname().split(".")[0]
    removed = 0
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if not match or match["host"] != host or process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


def process_alive(pid) -> bool:
    """Whether process `pid` runs on this host (ours counts; an unknown pid does not)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Fault injection for the crash tests: the command line sets a hook that kills the process
# at the Nth call (biounet.cli reads BIOUNET_FAULT_AT; library code never does).
_fault_hook = None


def set_fault_hook(hook) -> None:
    global _fault_hook
    _fault_hook = hook


def fault_point(what: str) -> None:
    """A place where a kill must leave every committed file intact (crash tests only)."""
    if _fault_hook is not None:
        _fault_hook(what)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_dir(folder: Path) -> Path:
    """Create `folder` (and parents), or explain why it cannot be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BiounetError(
            f"{folder}: cannot create this folder because a file is in the way; "
            "choose another output path"
        ) from None
    except OSError as exc:
        raise BiounetError(f"{folder}: cannot create this folder ({exc.strerror})") from None
    return folder


_UMASK = _umask()  # read once: setting it to read it is not thread-safe
