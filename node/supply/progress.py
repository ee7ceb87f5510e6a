"""Pull progress: rich bars per file and in total (MB/s, ETA), or JSON lines for machines.

Downloads run on several threads, so every reporter here is safe to call from any.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Protocol

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn, TransferSpeedColumn


class PullProgress(Protocol):
    """What a pull reports: a file starts (with bytes already had), grows, and ends."""

    def start(self, name: str, total: int, done: int) -> None: ...
    def advance(self, name: str, n: int) -> None: ...
    def finish(self, name: str, ok: bool, message: str = "") -> None: ...


class NullProgress:
    """Reports nothing (the node's own pull-on-start logs instead)."""

    def start(self, name: str, total: int, done: int) -> None:
        pass

    def advance(self, name: str, n: int) -> None:
        pass

    def finish(self, name: str, ok: bool, message: str = "") -> None:
        pass


class RichProgress:
    """One bar per file in flight and one for the total, each with MB/s and ETA.

    A file's bar goes away when it is done (a failed one stays, marked), so a model of
    many files shows what is arriving now, not a screen of finished ones.
    """

    def __init__(self, console: Console, total_bytes: int) -> None:
        self._bars = Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                              TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self._total = self._bars.add_task("total", total=total_bytes)
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RichProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def start(self, name: str, total: int, done: int) -> None:
        with self._lock:
            self._tasks[name] = self._bars.add_task(name, total=total, completed=done)
            self._bars.advance(self._total, done)

    def advance(self, name: str, n: int) -> None:
        with self._lock:
            self._bars.advance(self._tasks[name], n)
            self._bars.advance(self._total, n)

    def finish(self, name: str, ok: bool, message: str = "") -> None:
        with self._lock:
            task = self._tasks.get(name)
            if task is None:
                return
            if ok:
                self._bars.update(task, visible=False)
            else:
                self._bars.update(task, description=f"{name} FAILED")


@dataclass
class _FileState:
    total: int
    done: int
    resumed_from: int
    started: float
    emitted: float


class JsonProgress:
    """One JSON object per line: start, progress (at most every `interval_s` per file), done."""

    def __init__(self, out: IO[str] | None = None, interval_s: float = 0.5) -> None:
        self._out = out or sys.stdout
        self._interval = interval_s
        self._files: dict[str, _FileState] = {}
        self._lock = threading.Lock()

    def event(self, **event: object) -> None:
        """Write one JSON line (the CLI adds per-model results this way)."""
        self._out.write(json.dumps(event) + "\n")
        self._out.flush()

    def start(self, name: str, total: int, done: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._files[name] = _FileState(total, done, done, now, now)
            self.event(event="start", file=name, total=total, done=done)

    def advance(self, name: str, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            f = self._files[name]
            f.done += n
            if now - f.emitted < self._interval and f.done < f.total:
                return
            f.emitted = now
            rate = (f.done - f.resumed_from) / max(now - f.started, 1e-6)
            eta = (f.total - f.done) / rate if rate > 0 else None
            self.event(event="progress", file=name, total=f.total, done=f.done,
                       bytes_per_s=round(rate), eta_s=None if eta is None else round(eta, 1))

    def finish(self, name: str, ok: bool, message: str = "") -> None:
        with self._lock:
            f = self._files.get(name) or _FileState(0, 0, 0, 0.0, 0.0)
            self.event(event="done" if ok else "error", file=name, total=f.total, done=f.done,
                       **({"error": message} if message else {}))


class RichBuildProgress:
    """One bar per build phase (download in bytes, compile in build steps), for `infernode runtimes build`."""

    def __init__(self, console: Console) -> None:
        self._bars = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                              TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                              console=console, transient=False)
        self._task: TaskID | None = None

    def __enter__(self) -> RichBuildProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def stage(self, text: str, total: int) -> None:
        if self._task is not None:
            task = self._bars.tasks[self._task]
            self._bars.update(self._task, completed=task.total or task.completed)
        self._task = self._bars.add_task(text, total=total or None)

    def update(self, done: int, total: int) -> None:
        if self._task is not None:
            self._bars.update(self._task, completed=done, total=total)
