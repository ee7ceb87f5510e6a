"""API keys: records, secrets (kept only as SHA-256) and the in-memory key ring.

The ring is what the request path consults: a dict lookup by the SHA-256 of the
presented secret, then a constant-time comparison. It is refreshed from storage in
the background, never on the request path.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from node.errors import AuthenticationError

SECRET_PREFIX = "sk-"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


@dataclass(frozen=True)
class KeyRecord:
    """A key as stored; `secret_hash` is all that is kept of the secret."""

    id: str
    name: str
    secret_hash: str
    prefix: str                       # the first characters, to recognise a key in lists
    team: str | None = None
    models: tuple[str, ...] | None = None   # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_tokens: int | None = None
    budget_period: str = "day"
    user_rpm: int | None = None
    user_tpm: int | None = None
    expires_at: float | None = None
    revoked: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    plan: str | None = None
    budget_usd: float | None = None
    old_secret_hash: str | None = None      # the secret before the last rotation...
    old_valid_until: float | None = None    # ...accepted until then
    share: float | None = None              # weight in the fair order (None: the team's, plan's, else 1)
    priority: str | None = None             # "interactive" | "batch" (None: the team's, plan's, else interactive)

    def public(self) -> dict[str, Any]:
        """The record as the admin API shows it (never a hash)."""
        d = asdict(self)
        d.pop("secret_hash")
        d.pop("old_secret_hash")
        d["models"] = list(self.models) if self.models is not None else None
        return d

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def updated(self, **changes: Any) -> KeyRecord:
        return replace(self, **changes, updated_at=time.time())


class KeyRing:
    """Every key, indexed by secret hash, for constant-time lookups on the hot path."""

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_id: dict[str, KeyRecord] = {}
        self.replace_all(records)

    def replace_all(self, records: Iterable[KeyRecord]) -> None:
        by_hash, by_id = {}, {}
        for r in records:
            by_hash[r.secret_hash] = r
            if r.old_secret_hash:
                by_hash[r.old_secret_hash] = r
            by_id[r.id] = r
        # Swapping whole dicts keeps readers on the event loop consistent without locks.
        self._by_hash, self._by_id = by_hash, by_id

    def put(self, record: KeyRecord) -> None:
        by_hash = dict(self._by_hash)
        old = self._by_id.get(record.id)
        if old is not None:
            by_hash.pop(old.secret_hash, None)
            if old.old_secret_hash:
                by_hash.pop(old.old_secret_hash, None)
        by_hash[record.secret_hash] = record
        if record.old_secret_hash:
            by_hash[record.old_secret_hash] = record
        self._by_hash = by_hash
        self._by_id = {**self._by_id, record.id: record}

    def lookup(self, secret: str, now: float | None = None) -> KeyRecord | None:
        """The record for a presented secret (None if unknown), compared in constant time.

        A revoked or expired key raises AuthenticationError, so every route (even
        /v1/models) answers 401 with the reason.
        """
        digest = hash_secret(secret)
        record = self._by_hash.get(digest)
        if record is None:
            return None
        now = time.time() if now is None else now
        if not hmac.compare_digest(record.secret_hash, digest):
            # The secret before a rotation: valid only within its grace period.
            is_old = hmac.compare_digest(record.old_secret_hash or "", digest)
            if not (is_old and record.old_valid_until is not None and now < record.old_valid_until):
                if is_old:
                    raise AuthenticationError("this API key was rotated; use its new secret", code="key_rotated")
                return None
        if record.revoked:
            raise AuthenticationError("this API key has been revoked", code="key_revoked")
        if record.expired(now):
            raise AuthenticationError("this API key has expired", code="key_expired")
        return record

    def get(self, key_id: str) -> KeyRecord | None:
        return self._by_id.get(key_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def all(self) -> list[KeyRecord]:
        return list(self._by_id.values())
