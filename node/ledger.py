"""The usage ledger writer: rows queued in memory, written in batches by a thread.

`record` never blocks and never touches the disk; a background thread flushes every
`interval` seconds or `batch` rows, and `close` flushes what is left.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from node.storage import Storage, StorageUnavailable, UsageRow

log = logging.getLogger("infernode.ledger")


class Ledger:
    def __init__(self, storage: Storage, *, interval: float = 0.25, batch: int = 500, max_queued: int = 1_000_000) -> None:
        self.storage = storage
        self.interval, self.batch = interval, batch
        self._queue: deque[UsageRow] = deque(maxlen=max_queued)
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger", daemon=True)
        self.written = 0
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def record(self, row: UsageRow) -> None:
        """Queue a row (called on the event loop; O(1), no I/O)."""
        self._queue.append(row)
        if len(self._queue) >= self.batch:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _take(self) -> list[UsageRow]:
        rows = []
        while self._queue and len(rows) < self.batch * 4:
            rows.append(self._queue.popleft())
        return rows

    def flush(self) -> bool:
        """Write everything queued; False (rows kept) when the database is unavailable."""
        while self._queue:
            rows = self._take()
            try:
                self.storage.insert_usage(rows)
            except StorageUnavailable as exc:
                self._queue.extendleft(reversed(rows))
                self.failures += 1
                log.warning("ledger flush failed, %d rows kept: %s", len(self._queue), exc)
                return False
            self.written += len(rows)
        return True

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
