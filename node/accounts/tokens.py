"""Admin tokens: a role, an optional team, a secret kept only as SHA-256.

The ring answers "who is this bearer?" for the admin API: a dict lookup by the
SHA-256 of the presented secret and a constant-time comparison, as for API keys.
The bootstrap admin key (from the environment or data_dir/admin.key) is the
principal `bootstrap` with role admin.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from node.accounts.keys import hash_secret
from node.accounts.roles import Principal, Role
from node.config import Config
from node.errors import ConfigError

TOKEN_PREFIX = "sk-tok-"
BOOTSTRAP_ID = "bootstrap"


def new_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(8)


@dataclass(frozen=True)
class TokenRecord:
    """A token as stored; `secret_hash` is all that is kept of the secret."""

    id: str
    name: str
    role: str                      # admin | operator | viewer
    secret_hash: str
    prefix: str
    team: str | None = None
    revoked: bool = False
    created_by: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        """The record as the admin API shows it (never the hash)."""
        return {"id": self.id, "name": self.name, "role": self.role, "team": self.team, "prefix": self.prefix,
                "revoked": self.revoked, "created_by": self.created_by, "created_at": self.created_at,
                "updated_at": self.updated_at}

    def principal(self) -> Principal:
        return Principal(self.id, Role.parse(self.role), self.team)

    def updated(self, **changes: Any) -> TokenRecord:
        return replace(self, **changes, updated_at=time.time())


MIN_ADMIN_KEY_CHARS = 32   # the bootstrap admin key: shorter ones are refused at start (a guessable master key)
ADMIN_KEY_FIX = ("set a random key of 32 characters or more (e.g. `openssl rand -base64 32`), or unset it and "
                 "the node generates one into data_dir/admin.key")


def admin_key_problem(key: str) -> str | None:
    """Why a bootstrap admin key is refused, or None when it is long enough."""
    if len(key) < MIN_ADMIN_KEY_CHARS:
        return f"is {len(key)} characters long; at least {MIN_ADMIN_KEY_CHARS} are needed"
    return None


class TokenRing:
    """Every admin token plus the bootstrap key, for constant-time lookups."""

    def __init__(self, records: Iterable[TokenRecord] = ()) -> None:
        self._by_hash: dict[str, TokenRecord] = {}
        self._by_id: dict[str, TokenRecord] = {}
        self._bootstrap_hash = ""
        self.replace_all(records)

    def set_bootstrap(self, secret: str) -> None:
        self._bootstrap_hash = hash_secret(secret) if secret else ""

    def replace_all(self, records: Iterable[TokenRecord]) -> None:
        by_hash, by_id = {}, {}
        for r in records:
            by_hash[r.secret_hash] = r
            by_id[r.id] = r
        self._by_hash, self._by_id = by_hash, by_id

    def put(self, record: TokenRecord) -> None:
        by_hash = {h: r for h, r in self._by_hash.items() if r.id != record.id}
        by_hash[record.secret_hash] = record
        self._by_hash = by_hash
        self._by_id = {**self._by_id, record.id: record}

    def principal(self, secret: str) -> Principal | None:
        """The caller a presented secret stands for; None if unknown or revoked."""
        if not secret:
            return None
        digest = hash_secret(secret)
        # Compare against the bootstrap hash every time, so timing says nothing about which matched.
        is_bootstrap = bool(self._bootstrap_hash) and hmac.compare_digest(self._bootstrap_hash, digest)
        record = self._by_hash.get(digest)
        if record is not None and hmac.compare_digest(record.secret_hash, digest) and not record.revoked:
            return record.principal()
        if is_bootstrap:
            return Principal(BOOTSTRAP_ID, Role.ADMIN, None)
        return None

    def get(self, token_id: str) -> TokenRecord | None:
        return self._by_id.get(token_id)

    def all(self) -> list[TokenRecord]:
        return sorted(self._by_id.values(), key=lambda r: r.created_at)


def ensure_admin_key(config: Config) -> tuple[str, bool]:
    """The admin key, generating one into data_dir/admin.key (0600) when none is set; a short one is refused."""
    key = config.admin_key()
    if key:
        problem = admin_key_problem(key)
        if problem:
            where = (f"${config.node.admin_key_env}" if os.environ.get(config.node.admin_key_env)
                     else str(config.admin_key_path))
            raise ConfigError(where, "admin key", problem, ADMIN_KEY_FIX)
        return key, False
    path = config.admin_key_path
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "sk-admin-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True
