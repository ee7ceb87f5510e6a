"""Console sessions: who signed in, their CSRF token, and when the session ends.

A session id is 256 random bits, sent to the browser as an HttpOnly cookie and kept here
only as its SHA-256, so a dump of this table cannot be replayed. The principal's secret
(an admin token or an API key) stays in memory on the node: the browser never holds it.
Sessions are bounded (idle and absolute lifetimes, and a cap on their number, the oldest
going first) so sign-ins in a loop cannot grow the node's memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


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
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s, self.max_age_s, self.max_sessions = idle_s, max_age_s, max_sessions
        self._clock = clock
        self._by_digest: OrderedDict[str, Session] = OrderedDict()

    def open(self, principal: SignedIn) -> tuple[str, Session]:
        """A new session for `principal`: its cookie value (shown once) and the session."""
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(principal, secrets.token_urlsafe(32), now, now)
        self._by_digest[_digest(session_id)] = session
        while len(self._by_digest) > self.max_sessions:
            self._by_digest.popitem(last=False)
        return session_id, session

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
            del self._by_digest[digest]
            return None
        session.seen = now
        self._by_digest.move_to_end(digest)
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._by_digest.pop(_digest(session_id), None)

    def close_principal(self, principal_id: str) -> int:
        """End every session of one principal (its key or token was revoked); how many ended."""
        gone = [d for d, s in self._by_digest.items() if s.principal.id == principal_id]
        for d in gone:
            del self._by_digest[d]
        return len(gone)

    def __len__(self) -> int:
        return len(self._by_digest)


def csrf_ok(session: Session, presented: str | None) -> bool:
    """Whether a write carries the session's CSRF token (compared in constant time)."""
    return bool(presented) and hmac.compare_digest(session.csrf.encode(), presented.encode())  # type: ignore[union-attr]
