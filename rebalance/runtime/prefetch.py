"""Run the producer side of a loop in a background thread so that it overlaps the consumer's work.

The embed actors read, decode and preprocess batch i + 1 (Parquet/tar reads, PIL decoding, resizing: all
release the GIL for most of their time) while the model encodes batch i (torch releases the GIL too).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


def prefetch(items: Iterable[T], fn: Callable[[T], R], depth: int = 2) -> Iterator[R]:
    """``fn(item)`` for every item, in order, computed by one background thread up to ``depth`` results
    ahead of the consumer. An exception in the iteration or in ``fn`` is raised in the consumer at the
    position it occurred. Closing the generator early stops the thread after its current item."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                results.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, fn(item))):
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it
            put((False, err))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            got = results.get()
            if got is _DONE:
                return
            ok, value = got
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
