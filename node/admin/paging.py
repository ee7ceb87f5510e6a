"""Paging of every admin list: a bounded default page, a maximum, and the answer's shape."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Query

T = TypeVar("T")

DEFAULT_LIMIT = 100     # rows per page when the caller names no limit
MAX_LIMIT = 1000        # the most rows one page may ask for
MAX_OFFSET = 10_000_000


@dataclass(frozen=True)
class Paging:
    """Where a page starts and how long it is."""

    offset: int
    limit: int


def paging(limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
           offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> Paging:
    """A FastAPI dependency: `limit` (1..MAX_LIMIT, default DEFAULT_LIMIT) and `offset` from the query."""
    return Paging(offset, limit)


def listing(rows: Sequence[T], public: Callable[[T], dict[str, Any]], at: Paging, *, has_more: bool,
            total: int | None = None, **extra: Any) -> dict[str, Any]:
    """The list answer: `data`, where it starts, its limit, whether more follow (and `total` when known)."""
    body: dict[str, Any] = {"object": "list", **extra, "data": [public(r) for r in rows], "offset": at.offset,
                            "limit": at.limit, "has_more": has_more}
    if total is not None:
        body["total"] = total
    return body
