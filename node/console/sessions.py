"""Console sessions: who signed in, their CSRF token, and when the session ends.

A session id is 256 random bits, sent to the browser as an HttpOnly cookie and kept here
only as its SHA-256, so a dump of this table cannot be replayed. The principal's secret
(an admin token or an API key) stays in memory on the node: the browser never holds it.
Sessions are bounded (idle and absolute lifetimes, and a cap on their number, the oldest
going first) so sign-ins in a loop cannot grow the node's memory. One principal holds at
most `max_per_principal` sessions (its own oldest goes first), and when the whole table is
full a new session evicts the oldest of its own kind (API keys' sign-ins never push out
admin tokens' sessions), so one key signing in a loop cannot sign anyone else out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_PER_PRINCIPAL = 16   # console sessions one admin token or API key may hold at once


@dataclass(frozen=True, slots=True)
class SignedIn:
    """Who a console session acts for: an admin token (with its role) or an API key, and its secret."""

    kind: str                   # "admin" (an admin token) or "key" (an API key)
    role: str                   # admin | operator | viewer for tokens; "key" for API keys
    id: str
    name: str
    team: str | None
    secret: str = field(repr=False)

    def public(self) -> dict[str, str | None]:
        return {"kind": self.kind, "role": self.role, "id": self.id, "name": self.name, "team": self.team}


@dataclass(slots=True)
class Session:
    principal: SignedIn
    csrf: str
    created: float
    seen: float


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    """The signed-in sessions, in memory (a node restart signs everyone out)."""

    def __init__(self, *, idle_s: float = 1800.0, max_age_s: float = 12 * 3600.0, max_sessions: int = 10_000,
                 max_per_principal: int = MAX_PER_PRINCIPAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s, self.max_age_s, self.max_sessions = idle_s, max_age_s, max_sessions
        self.max_per_principal = max_per_principal
        self._clock = clock
        self._by_digest: OrderedDict[str, Session] = OrderedDict()
        # principal id -> its sessions' digests, oldest first; kind -> its sessions' digests, oldest first
        self._by_principal: dict[str, OrderedDict[str, None]] = {}
        self._by_kind: dict[str, OrderedDict[str, None]] = {}

    def open(self, principal: SignedIn) -> tuple[str, Session]:
        """A new session for `principal`: its cookie value (shown once) and the session."""
        mine = self._by_principal.get(principal.id)
        while mine and len(mine) >= self.max_per_principal:
            self._drop(next(iter(mine)))                       # the principal's own oldest session
        kind = self._by_kind.get(principal.kind)
        while len(self._by_digest) >= self.max_sessions and kind:
            self._drop(next(iter(kind)))                       # the oldest of the same kind, never another kind's
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(principal, secrets.token_urlsafe(32), now, now)
        digest = _digest(session_id)
        self._by_digest[digest] = session
        self._by_principal.setdefault(principal.id, OrderedDict())[digest] = None
        self._by_kind.setdefault(principal.kind, OrderedDict())[digest] = None
        return session_id, session

    def _drop(self, digest: str) -> None:
        session = self._by_digest.pop(digest, None)
        if session is None:
            return
        for index, name in ((self._by_principal, session.principal.id), (self._by_kind, session.principal.kind)):
            table = index.get(name)
            if table is not None:
                table.pop(digest, None)
                if not table:
                    del index[name]

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this cookie value, or None (unknown, idle too long or too old)."""
        if not session_id or len(session_id) > 128:
            return None
        digest = _digest(session_id)
        session = self._by_digest.get(digest)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > self.idle_s or now - session.created > self.max_age_s:
            self._drop(digest)
            return None
        session.seen = now
        self._by_digest.move_to_end(digest)
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._drop(_digest(session_id))

    def close_principal(self, principal_id: str) -> int:
        """End every session of one principal (its key or token was revoked); how many ended."""
        gone = list(self._by_principal.get(principal_id, ()))
        for d in gone:
            self._drop(d)
        return len(gone)

    def __len__(self) -> int:
        return len(self._by_digest)


def csrf_ok(session: Session, presented: str | None) -> bool:
    """Whether a write carries the session's CSRF token (compared in constant time)."""
    return bool(presented) and hmac.compare_digest(session.csrf.encode(), presented.encode())  # type: ignore[union-attr]
