"""Versioned schema migrations: an ordered list of named steps, each applied once.

The SQL is written to run unchanged on SQLite and PostgreSQL.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, list[str]]] = [
    ("001_keys_teams_usage", [
        """CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            secret_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            team TEXT,
            models TEXT,
            rpm BIGINT, tpm BIGINT, max_parallel BIGINT,
            budget_tokens BIGINT, budget_period TEXT NOT NULL DEFAULT 'day',
            user_rpm BIGINT, user_tpm BIGINT,
            expires_at DOUBLE PRECISION,
            revoked INTEGER NOT NULL DEFAULT 0,
            metadata TEXT NOT NULL DEFAULT '{}',
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE teams (
            name TEXT PRIMARY KEY,
            rpm BIGINT, tpm BIGINT, max_parallel BIGINT,
            budget_tokens BIGINT, budget_period TEXT NOT NULL DEFAULT 'day',
            metadata TEXT NOT NULL DEFAULT '{}',
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE usage (
            request_id TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            key_id TEXT,
            team TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            end_user TEXT,
            prompt_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0,
            status INTEGER NOT NULL,
            latency_ms DOUBLE PRECISION,
            ttft_ms DOUBLE PRECISION,
            cost DOUBLE PRECISION NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX usage_ts ON usage (ts)",
        "CREATE INDEX usage_key_ts ON usage (key_id, ts)",
    ]),
    # One counter bumped in the same transaction as every key or team write: nodes
    # sharing a database poll it (cheap, and immune to clock skew between nodes).
    ("002_settings_version_team_usage", [
        "CREATE TABLE settings_version (id INTEGER PRIMARY KEY, version BIGINT NOT NULL)",
        "INSERT INTO settings_version (id, version) VALUES (1, 0)",
        "CREATE INDEX usage_team_ts ON usage (team, ts)",
    ]),
    # Which client API a request came through (OpenAI's, Anthropic's Messages, Responses, Ollama's).
    ("003_usage_api", [
        "ALTER TABLE usage ADD COLUMN api TEXT NOT NULL DEFAULT 'openai'",
    ]),
    # The primary key `request_id` is made by the node from now on (unique per request,
    # never chosen by a client); the client's x-request-id moves to a column of its own.
    # Rows written before were keyed by the client's id when it sent one: it is kept as theirs.
    ("004_usage_client_request_id", [
        "ALTER TABLE usage ADD COLUMN client_request_id TEXT",
        "UPDATE usage SET client_request_id = request_id",
        "CREATE INDEX usage_client_request_id ON usage (client_request_id)",
    ]),
]

LATEST = MIGRATIONS[-1][0]
