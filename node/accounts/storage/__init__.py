"""Storage: keys, teams and the usage ledger in SQLite (default) or PostgreSQL.

One interface (`Storage`), two backends that differ only in how they connect and
how they spell a placeholder. Nothing here knows about HTTP. Calls are blocking and
are made from worker threads, never from the request path.
"""

from __future__ import annotations

from node.accounts.storage.sql import SqlStorage, Storage, StorageConflict, StorageRejected, StorageTimeout, StorageUnavailable, UsageRow


def open_storage(url: str) -> Storage:
    """Connect to `sqlite:///PATH` or `postgresql://...` (no migration yet)."""
    if url.startswith("sqlite:///"):
        from node.accounts.storage.sqlite import SqliteBackend
        return SqlStorage(SqliteBackend(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from node.accounts.storage.postgres import PostgresBackend
        return SqlStorage(PostgresBackend(url))
    raise ValueError(f"unsupported database url {url!r}")


__all__ = ["Storage", "SqlStorage", "StorageConflict", "StorageRejected", "StorageTimeout", "StorageUnavailable", "UsageRow", "open_storage"]
