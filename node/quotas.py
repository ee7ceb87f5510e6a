"""Admission on the hot path: key validity, allowed models and per-key limits, in memory.

`Quotas.admit` runs before a request is proxied and either raises (401/403/429) or
returns an `Admission` whose `finish` charges what the worker reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from node.errors import AuthenticationError, PermissionDenied, RateLimited
from node.keys import KeyRecord


@dataclass
class Admission:
    """One admitted request; `finish` must be called exactly once."""

    quotas: "Quotas"
    key: KeyRecord
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    _done: bool = False

    def finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self._done:
            return
        self._done = True
        self.quotas._release(self, prompt_tokens, completion_tokens)


class Quotas:
    """Per-key limits held in memory."""

    def __init__(self) -> None:
        self._parallel: dict[str, int] = {}

    def admit(self, key: KeyRecord, model: str, user: str | None = None, now: float | None = None) -> Admission:
        now = time.time() if now is None else now
        if key.revoked:
            raise AuthenticationError("this API key has been revoked", code="key_revoked")
        if key.expired(now):
            raise AuthenticationError("this API key has expired", code="key_expired")
        if not key.allows(model):
            raise PermissionDenied(f"this API key may not use model '{model}'", param="model")
        if key.max_parallel is not None:
            if self._parallel.get(key.id, 0) >= key.max_parallel:
                raise RateLimited(
                    f"this key already has {key.max_parallel} requests in flight", retry_after=1, reason="parallel"
                )
        self._parallel[key.id] = self._parallel.get(key.id, 0) + 1
        return Admission(self, key, model)

    def _release(self, adm: Admission, prompt_tokens: int, completion_tokens: int) -> None:
        n = self._parallel.get(adm.key.id, 1) - 1
        if n <= 0:
            self._parallel.pop(adm.key.id, None)
        else:
            self._parallel[adm.key.id] = n
