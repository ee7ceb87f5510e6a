"""The audit log: one hash-chained record per admin write.

Each record's hash is sha256(previous record's hash + the record's canonical JSON),
the first record's previous hash being GENESIS. Editing a record changes its hash;
deleting one breaks the link of the record after it; `verify` finds both. Deleting
the newest records leaves a shorter, valid chain: compare the head `verify` reports
with one kept elsewhere to catch that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

GENESIS = "0" * 64
# Fields never written into `changes`, whatever a route passes (secrets and their hashes).
SECRET_FIELDS = frozenset({"key", "secret", "token", "secret_hash", "old_secret_hash"})


@dataclass(frozen=True)
class AuditRecord:
    """One admin write: who, from where, what, on what, with which changes."""

    seq: int
    ts: float
    actor_id: str
    actor_role: str
    source: str
    action: str
    target: str
    changes: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    prev_hash: str = GENESIS
    hash: str = ""

    def canonical(self) -> bytes:
        """The record (everything but its own hash) as canonical JSON."""
        d = asdict(self)
        d.pop("hash")
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()

    def public(self) -> dict[str, Any]:
        return asdict(self)


def chain_hash(prev_hash: str, record: AuditRecord) -> str:
    return hashlib.sha256(prev_hash.encode() + record.canonical()).hexdigest()


def scrub(changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` without secrets, and with values JSON can round-trip (floats stay floats)."""
    return {k: v for k, v in changes.items() if k not in SECRET_FIELDS}


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: ok, how many records, the head hash, and the first bad record."""

    ok: bool
    records: int
    head: str
    bad_seq: int | None = None
    problem: str = ""

    def public(self) -> dict[str, Any]:
        return asdict(self)


def verify(records: Iterable[AuditRecord]) -> Verdict:
    """Walk the chain in seq order; the first record whose link or hash is wrong fails it."""
    prev, n, last_seq = GENESIS, 0, 0
    for r in records:
        n += 1
        if r.prev_hash != prev or r.seq != last_seq + 1:
            return Verdict(False, n, prev, r.seq, f"record {r.seq}: does not follow record {last_seq} "
                                                   "(a record was deleted or rewritten)")
        if chain_hash(prev, r) != r.hash:
            return Verdict(False, n, prev, r.seq, f"record {r.seq}: its contents do not match its hash (edited)")
        prev, last_seq = r.hash, r.seq
    return Verdict(True, n, prev)
