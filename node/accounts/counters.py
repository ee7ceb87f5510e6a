"""One scope's counters for admission: the last minute's requests and tokens, budgets, in flight."""

from __future__ import annotations

from collections import deque

WINDOW = 60.0


class Counter:
    """One scope's counters: the admissions and token charges of the last minute, budgets, in flight.

    Admissions are an exact log of timestamps; token charges are merged per whole
    second ([second, tokens]), so a scope holds at most 61 of them, and a second's
    tokens leave the window when all of that second has.
    """

    __slots__ = ("hits", "tokens", "token_sum", "day", "day_used", "month", "month_used", "parallel",
                 "day_usd", "month_usd")

    def __init__(self) -> None:
        self.hits: deque[float] = deque()
        self.tokens: deque[list[int]] = deque()
        self.token_sum = 0
        self.day = self.month = -1
        self.day_used = self.month_used = 0
        self.day_usd = self.month_usd = 0.0
        self.parallel = 0

    def prune(self, now: float) -> None:
        edge = now - WINDOW
        hits = self.hits
        while hits and hits[0] <= edge:
            hits.popleft()
        toks = self.tokens
        while toks and toks[0][0] + 1 <= edge:
            self.token_sum -= toks.popleft()[1]

    def roll(self, day: int, month: int) -> None:
        if self.day != day:
            self.day, self.day_used, self.day_usd = day, 0, 0.0
        if self.month != month:
            self.month, self.month_used, self.month_usd = month, 0, 0.0

    def used(self, period: str) -> int:
        return self.month_used if period == "month" else self.day_used

    def spent(self, period: str) -> float:
        return self.month_usd if period == "month" else self.day_usd

    def charge(self, ts: float, tokens: int, budget: bool, cost: float = 0.0) -> None:
        if budget and cost > 0:
            self.day_usd += cost
            self.month_usd += cost
        if tokens <= 0:
            return
        self.add_tokens(ts, tokens)
        if budget:
            self.day_used += tokens
            self.month_used += tokens

    def charge_budget(self, tokens: int, budget: bool, cost: float = 0.0) -> None:
        """Charge budgets only (a batch line): the rate window is left to interactive traffic."""
        if not budget:
            return
        self.day_usd += max(0.0, cost)
        self.month_usd += max(0.0, cost)
        self.day_used += max(0, tokens)
        self.month_used += max(0, tokens)

    def add_tokens(self, ts: float, tokens: int) -> None:
        sec = int(ts)
        toks = self.tokens
        if toks and toks[-1][0] == sec:
            toks[-1][1] += tokens
        else:
            toks.append([sec, tokens])
        self.token_sum += tokens

    def tokens_free_in(self, limit: int, now: float) -> float:
        """Seconds until the last minute's tokens drop below `limit`."""
        excess = self.token_sum - limit
        for ts, n in self.tokens:
            excess -= n
            if excess < 0:
                return ts + 1 + WINDOW - now
        return 0.0

    def idle(self) -> bool:
        return not self.hits and not self.tokens and self.parallel == 0
