"""The fair queue: who goes next among the requests waiting for one model's slots.

Pure bookkeeping, no I/O and no clock of its own. Order of service:
- priority bands: `interactive` before `batch`, except that batch keeps at least
  `batch_min_share` of the cost served while both bands wait (a deficit counter), so
  it is never starved;
- within a band, between tenants: start-time fair queuing (Goyal et al., 1996) at the
  tenant level. A tenant that starts waiting is stamped `start = max(V, its finish)`;
  serving one of its requests of cost c moves its finish to `start + c / share` and
  the band's virtual time V to that start. The tenant with the smallest start goes
  next, so service follows the shares and an idle tenant's share goes to whoever
  waits (work-conserving);
- within a tenant, round robin between its keys; within a key, first come, first served.

Costs are known when a request arrives (tokens asked: prompt estimate + max_tokens)
but a tenant's requests are stamped only when served, because which of its keys
goes next is decided then.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Priority(IntEnum):
    """A request's band; lower goes first."""

    INTERACTIVE = 0
    BATCH = 1

    @classmethod
    def parse(cls, text: str | None) -> Priority | None:
        """The band named `text` ("interactive" | "batch"), or None."""
        if text == "interactive":
            return cls.INTERACTIVE
        if text == "batch":
            return cls.BATCH
        return None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(slots=True, eq=False)
class Ticket:
    """One waiting request; `payload` is the scheduler's (e.g. a future)."""

    tenant: str
    key: str
    priority: Priority
    cost: float
    share: float
    arrived: float
    payload: Any = None
    queued: bool = False


@dataclass(slots=True, eq=False)
class _Tenant:
    name: str
    finish: float = 0.0                      # virtual finish of the last request served
    start: float = 0.0                       # virtual start of the next one, while waiting
    waiting: int = 0
    keys: dict[str, deque[Ticket]] = field(default_factory=dict)  # insertion order = round robin order
    entry: int = -1                          # its live heap entry's sequence number (others are stale)


class _Band:
    """One priority band: tenants under start-time fair queuing."""

    def __init__(self) -> None:
        self.vtime = 0.0
        self.max_finish = 0.0
        self.waiting = 0
        self.tenants: dict[str, _Tenant] = {}
        self._heap: list[tuple[float, int, _Tenant]] = []
        self._seq = itertools.count()

    def push(self, t: Ticket) -> None:
        tenant = self.tenants.get(t.tenant)
        if tenant is None:
            if len(self.tenants) >= 1024:
                self._forget_idle()
            tenant = self.tenants[t.tenant] = _Tenant(t.tenant)
        q = tenant.keys.get(t.key)
        if q is None:
            q = tenant.keys[t.key] = deque()
        q.append(t)
        tenant.waiting += 1
        self.waiting += 1
        if tenant.waiting == 1:  # it starts waiting: stamped from the band's clock
            tenant.start = max(self.vtime, tenant.finish)
            self._schedule(tenant)

    def _schedule(self, tenant: _Tenant) -> None:
        tenant.entry = next(self._seq)
        heapq.heappush(self._heap, (tenant.start, tenant.entry, tenant))

    def _forget_idle(self) -> None:
        """Drop idle tenants owed nothing: one coming back is stamped from V, as if it had been kept."""
        v = self.vtime
        self.tenants = {n: t for n, t in self.tenants.items() if t.waiting or t.finish > v}

    def head(self) -> Ticket | None:
        """The ticket that would go next (without taking it)."""
        tenant = self._head_tenant()
        return None if tenant is None else next(iter(tenant.keys.values()))[0]

    def _head_tenant(self) -> _Tenant | None:
        heap = self._heap
        while heap:
            _, entry, tenant = heap[0]
            if tenant.waiting and entry == tenant.entry:
                return tenant
            heapq.heappop(heap)  # stale: emptied by cancellations or re-stamped
        return None

    def pop(self) -> Ticket | None:
        tenant = self._head_tenant()
        if tenant is None:
            return None
        heapq.heappop(self._heap)
        key, q = next(iter(tenant.keys.items()))
        t = q.popleft()
        del tenant.keys[key]
        if q:  # round robin: the key goes to the back of its tenant's line
            tenant.keys[key] = q
        tenant.waiting -= 1
        self.waiting -= 1
        self.vtime = tenant.start
        tenant.finish = tenant.start + t.cost / t.share
        self.max_finish = max(self.max_finish, tenant.finish)
        if tenant.waiting:
            tenant.start = tenant.finish
            self._schedule(tenant)
        elif not self.waiting:
            self.vtime = self.max_finish  # idle: past debts are forgiven, as in SFQ
        return t

    def remove(self, t: Ticket) -> None:
        tenant = self.tenants[t.tenant]
        q = tenant.keys[t.key]
        q.remove(t)
        if not q:
            del tenant.keys[t.key]
        tenant.waiting -= 1
        self.waiting -= 1
        # An emptied tenant's heap entry goes stale (waiting == 0) and is dropped when met.


class FairQueue:
    """Waiting requests of one model, in fair order (see the module's docstring)."""

    def __init__(self, batch_min_share: float = 0.1, max_queued: int | None = None) -> None:
        self.batch_min_share = batch_min_share
        self.max_queued = max_queued     # per tenant, both bands together (None: no cap)
        self._bands = (_Band(), _Band())
        self._tenant_waiting: dict[str, int] = {}
        self._deficit = 0.0              # batch's cost owed under its floor, while both bands wait
        self.size = 0                    # tickets waiting, both bands (read on the scheduler's fast path)

    def __len__(self) -> int:
        return self.size

    def depth(self, priority: Priority) -> int:
        return self._bands[priority].waiting

    def tenant_waiting(self, tenant: str) -> int:
        return self._tenant_waiting.get(tenant, 0)

    def full_for(self, tenant: str) -> bool:
        """Whether the tenant already has its `max_queued` requests waiting."""
        return self.max_queued is not None and self._tenant_waiting.get(tenant, 0) >= self.max_queued

    def push(self, t: Ticket) -> None:
        """Queue a ticket (the caller checks `full_for` first)."""
        if not t.share > 0 or not t.cost >= 0:
            raise ValueError("a ticket needs share > 0 and cost >= 0")
        self._bands[t.priority].push(t)
        self.size += 1
        self._tenant_waiting[t.tenant] = self._tenant_waiting.get(t.tenant, 0) + 1
        t.queued = True

    def remove(self, t: Ticket) -> bool:
        """Take a waiting ticket out (its client went away or its time ran out); False if it was not waiting."""
        if not t.queued:
            return False
        self._bands[t.priority].remove(t)
        self._left(t)
        return True

    def peek(self) -> Ticket | None:
        """The ticket `pop` would return."""
        band = self._band()
        return None if band is None else band.head()

    def pop(self, batch: bool = True) -> Ticket | None:
        """The next ticket to serve (None when nothing waits); `batch` False: interactive ones only."""
        inter, batch_band = self._bands
        contended = bool(inter.waiting and batch_band.waiting)
        band = self._band() if batch else (inter if inter.waiting else None)
        if band is None:
            return None
        t = band.pop()
        assert t is not None  # a band with waiters has a head
        if contended:
            f = self.batch_min_share
            self._deficit += -(1 - f) * t.cost if t.priority is Priority.BATCH else f * t.cost
        elif not batch_band.waiting:
            self._deficit = 0.0  # the floor holds while batch waits, not across spells without it
        self._left(t)
        return t

    def _band(self) -> _Band | None:
        inter, batch = self._bands
        if inter.waiting and batch.waiting:
            return batch if self._deficit > 0 and self.batch_min_share > 0 else inter
        if inter.waiting:
            return inter
        return batch if batch.waiting else None

    def _left(self, t: Ticket) -> None:
        t.queued = False
        self.size -= 1
        n = self._tenant_waiting[t.tenant] - 1
        if n:
            self._tenant_waiting[t.tenant] = n
        else:
            del self._tenant_waiting[t.tenant]

    def waiting(self) -> Iterator[Ticket]:
        """Every waiting ticket, band by band, tenant by tenant (for listings; O(n))."""
        for band in self._bands:
            for tenant in band.tenants.values():
                for q in tenant.keys.values():
                    yield from q
