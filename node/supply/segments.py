"""A large file's byte ranges (segments) and their progress, kept beside its partial file.

    partial/<hex>            the file, preallocated to its full size, written in place
    partial/<hex>.segments   JSON: the locked size and digest, and [start, end, done] per segment

The state is replaced atomically (a temporary file renamed over it), and only after the
bytes it counts were flushed to the partial file, so after a kill it never claims more
than the file holds. It is written before the file is preallocated: a partial without
state is a single-stream one, whose size is what it holds.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from node.supply.lockfile import LockedFile
from node.supply.store import Store, check_hex

MAX_SEGMENT = 256 * 1024 * 1024  # a lost connection or a kill costs at most this much again
SEGMENTS_PER_CONNECTION = 4  # enough that a slow connection's share is taken by the others
ALIGN = 64 * 1024
MAX_SEGMENTS = 100_000  # what a state file may list (a 25 TB file at the largest segment size)


@dataclass
class Segment:
    """Bytes [start, end) of the file, of which the first `done` are on disk."""

    start: int
    end: int
    done: int = 0

    @property
    def pos(self) -> int:
        return self.start + self.done

    @property
    def finished(self) -> bool:
        return self.pos >= self.end


def plan(size: int, have: int, connections: int, min_segment: int) -> list[Segment] | None:
    """Segments for a file of `size` with `have` bytes already at its head; None: one connection.

    Several segments per connection, each at least `min_segment` and at most MAX_SEGMENT,
    taken in order: the hasher follows close behind the lowest one still arriving.
    """
    rest = size - have
    if connections < 2 or rest <= min_segment:
        return None
    seg = min(MAX_SEGMENT, max(min_segment, -(-rest // (connections * SEGMENTS_PER_CONNECTION))))
    seg = -(-seg // ALIGN) * ALIGN
    out = [Segment(0, have, have)] if have else []
    out += [Segment(s, min(s + seg, size)) for s in range(have, size, seg)]
    return out


def state_path(store: Store, locked: LockedFile) -> Path:
    return store.partial_dir / f"{check_hex(locked.sha256)}.segments"


def save(path: Path, locked: LockedFile, segments: list[tuple[int, int, int]]) -> None:
    """Replace the state atomically (what a reader finds is the old state or the new one, whole)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"size": locked.size, "sha256": locked.sha256, "segments": segments}))
    os.replace(tmp, path)


def load(path: Path, locked: LockedFile) -> list[Segment] | None:
    """The saved segments, or None when there are none that fit this file (then start over)."""
    try:
        doc = json.loads(path.read_text())
        if doc["size"] != locked.size or doc["sha256"] != locked.sha256 or len(doc["segments"]) > MAX_SEGMENTS:
            return None
        segs = [Segment(int(a), int(b), int(d)) for a, b, d in doc["segments"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    expect = 0
    for s in segs:  # they must tile the file exactly, each done within its bounds
        if s.start != expect or s.end <= s.start or not 0 <= s.done <= s.end - s.start:
            return None
        expect = s.end
    return segs if segs and expect == locked.size else None


def remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".tmp")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def had(store: Store, locked: LockedFile) -> int:
    """Bytes of a blob already downloaded, that a resume does not fetch again."""
    path = state_path(store, locked)
    if path.exists():  # a ranged partial: its size says nothing (preallocated), its state all
        segs = load(path, locked)
        return sum(s.done for s in segs) if segs is not None else 0
    return min(store.partial_size(locked), locked.size)
