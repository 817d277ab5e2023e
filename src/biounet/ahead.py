"""Iterators computed ahead in a background thread, so that the stages of the tile loop overlap.

Overlap-tile prediction has three stages per batch of tiles: read and normalise the input
windows, run the network, use the outputs (argmax, compression, writing). Their heavy parts
(numpy copies, zlib, tifffile's decoding, every engine's forward pass) release the GIL, so
each stage can run in a thread of its own beside the others: reading that waits on storage, or
a forward pass on a GPU, then no longer leaves the rest idle (on a CPU whose cores the forward
pass already fills, it gains nothing: docs/benchmarks.md). `ahead` is that thread: a bounded
queue between a producer and the consumer, with what a library needs around it -- the
producer's exception raised in the consumer's thread, the producer stopped and joined when
the consumer stops early, and at most `depth` items waiting.
Written here because the standard library has the parts (`threading`, `queue`) but not the
iterator: `concurrent.futures` executors do not bound how far a producer runs ahead, and
leave a stopped consumer's producer running.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()
_POLL_S = 0.1  # how soon a producer blocked on a full queue sees that the consumer stopped


class _Raised:
    """An exception of the producer, carried to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def ahead(items: Iterable[T], depth: int = 1, name: str = "biounet-ahead") -> Iterator[T]:
    """The items of `items`, computed up to `depth` items ahead in a background thread.

    Parameters
    ----------
    items : iterable
        Iterated in the background thread only (a generator's code runs there); closed there
        (``items.close()`` when it has one) when it ends or the consumer stops.
    depth : int
        Items computed and waiting at most; memory grows with it.
    name : str
        The thread's name (for debuggers and logs).

    Yields
    ------
    The items, in order. An exception raised by `items` is raised here, after the items
    before it. Closing this iterator early (``break``, an exception in the consumer, Ctrl-C)
    stops the producer and waits for it to finish the item it is computing (in the tile loop:
    one forward pass). Close it (`contextlib.closing`) rather than leave it to the garbage
    collector, which may run in any thread.

    Examples
    --------
    >>> list(ahead(x * x for x in range(4)))
    [0, 1, 4, 9]
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, not {depth}")
    waiting: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                waiting.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        source = None
        try:
            source = iter(items)
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 -- every exception goes to the consumer
            put(_Raised(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = waiting.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        if thread is not threading.current_thread():  # closed by its own producer's collector
            thread.join()
