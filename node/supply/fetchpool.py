"""The connections of one pull: a fixed number of threads taking jobs by priority.

Every file of every model in a pull, and every byte range of a large file, is a job
here, so the pull as a whole never holds more connections than the limit. Jobs with
the lowest priority run first; a job may add jobs (a file that turned out to serve
ranges adds its other segments, ahead of the smaller files still waiting).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable


class FetchPool:
    """`size` worker threads; `submit` queues a job, `wait` returns when none is left."""

    def __init__(self, size: int) -> None:
        self._heap: list[tuple[tuple[int, ...], int, Callable[[], None]]] = []
        self._order = itertools.count()  # equal priorities run in the order submitted
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"pull-{i}", daemon=True) for i in range(size)]
        for t in self._threads:
            t.start()

    def submit(self, priority: tuple[int, ...], job: Callable[[], None]) -> None:
        """Queue `job` (it handles its own errors: whatever it raises is dropped)."""
        with self._cond:
            if not self._closed:
                heapq.heappush(self._heap, (priority, next(self._order), job))
                self._cond.notify()

    def wait(self) -> None:
        """Block until every job, and every job those added, has run."""
        with self._cond:
            while self._heap or self._running:
                self._cond.wait(0.25)  # in slices, so Ctrl-C reaches the waiting thread

    def close(self, drop: bool = False) -> None:
        """Stop the threads once the queue is empty (or at once, dropping it, with `drop`)."""
        with self._cond:
            self._closed = True
            if drop:
                self._heap.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if not self._heap:
                    return
                _, _, job = heapq.heappop(self._heap)
                self._running += 1
            try:
                job()
            except BaseException:  # noqa: S110 - a job records its own failure; the pool must go on
                pass
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()
