"""End-user counters (the `user` field under a key with user_rpm/user_tpm), bounded in number and size.

`user` is the client's to choose, so the table must not grow with it: each end user is
held by a 16-byte digest of its name (a 200 KB `user` costs 16 bytes, not 200 KB), and
each key keeps at most `per_key` of them, least recently used first out. An evicted end
user starts afresh: its per-user limits are the key's own business (a client may pick a
new `user` at will anyway); the key's and its team's limits never are forgotten.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator

from node.accounts.counters import Counter

MAX_PER_KEY = 1024   # end users with live counters under one key


def user_digest(user: str) -> bytes:
    """A fixed-size name for an end user (surrogatepass: any Python string has one)."""
    return hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class EndUsers:
    """Per-key LRU tables of end-user counters."""

    def __init__(self, per_key: int = MAX_PER_KEY) -> None:
        self.per_key = per_key
        self._keys: dict[str, OrderedDict[bytes, Counter]] = {}
        self.evicted = 0

    def counter(self, key_id: str, user: str) -> Counter:
        """The end user's counter under the key, made when new (evicting the key's least recently used)."""
        table = self._keys.get(key_id)
        if table is None:
            table = self._keys[key_id] = OrderedDict()
        d = user_digest(user)
        c = table.get(d)
        if c is not None:
            table.move_to_end(d)
            return c
        if len(table) >= self.per_key:
            self._evict(table)
        c = table[d] = Counter()
        return c

    def _evict(self, table: OrderedDict[bytes, Counter]) -> None:
        """Drop the least recently used idle counter, else simply the least recently used (in-flight
        admissions keep their own reference, so finishing them still works)."""
        for i, (d, c) in enumerate(table.items()):
            if c.idle():
                del table[d]
                break
            if i >= 32:   # bounded scan: past it, the least recently used goes
                table.popitem(last=False)
                break
        else:
            table.popitem(last=False)
        self.evicted += 1

    def sweep(self, now: float) -> int:
        """Forget idle counters (end users carry no budget); returns how many."""
        gone = 0
        for key_id in list(self._keys):
            table = self._keys[key_id]
            idle = []
            for d, c in table.items():
                c.prune(now)
                if c.idle():
                    idle.append(d)
            for d in idle:
                del table[d]
            gone += len(idle)
            if not table:
                del self._keys[key_id]
        return gone

    def counters(self) -> Iterator[Counter]:
        for table in self._keys.values():
            yield from table.values()

    def __len__(self) -> int:
        return sum(len(t) for t in self._keys.values())
