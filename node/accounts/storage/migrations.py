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
    # Admin tokens with roles, the hash-chained audit log, plans, money budgets and
    # key rotation (the previous secret's hash stays valid until old_valid_until).
    ("005_roles_plans_audit", [
        """CREATE TABLE admin_tokens (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            secret_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            team TEXT,
            revoked INTEGER NOT NULL DEFAULT 0,
            created_by TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE audit (
            seq BIGINT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            actor_id TEXT NOT NULL,
            actor_role TEXT NOT NULL,
            source TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            changes TEXT NOT NULL,
            request_id TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        "CREATE INDEX audit_ts ON audit (ts)",
        """CREATE TABLE plans (
            name TEXT PRIMARY KEY,
            models TEXT,
            rpm BIGINT, tpm BIGINT, max_parallel BIGINT,
            budget_tokens BIGINT, budget_usd DOUBLE PRECISION, budget_period TEXT NOT NULL DEFAULT 'day',
            metadata TEXT NOT NULL DEFAULT '{}',
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        "ALTER TABLE keys ADD COLUMN plan TEXT",
        "ALTER TABLE keys ADD COLUMN budget_usd DOUBLE PRECISION",
        "ALTER TABLE keys ADD COLUMN old_secret_hash TEXT",
        "ALTER TABLE keys ADD COLUMN old_valid_until DOUBLE PRECISION",
        "ALTER TABLE teams ADD COLUMN plan TEXT",
        "ALTER TABLE teams ADD COLUMN budget_usd DOUBLE PRECISION",
    ]),
    # Batch jobs (OpenAI's Files and Batches API): stored files, batches, and each line's result,
    # recorded once (its primary key), which is what keeps a recorded line from running again.
    ("009_files_batches", [
        """CREATE TABLE batch_files (
            id TEXT PRIMARY KEY,
            key_id TEXT,
            team TEXT,
            purpose TEXT NOT NULL,
            filename TEXT NOT NULL,
            bytes BIGINT NOT NULL,
            lines BIGINT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL
        )""",
        "CREATE INDEX batch_files_key ON batch_files (key_id, created_at)",
        """CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            key_id TEXT,
            team TEXT,
            input_file_id TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            metadata TEXT NOT NULL,
            errors TEXT NOT NULL,
            total BIGINT NOT NULL,
            completed BIGINT NOT NULL,
            failed BIGINT NOT NULL,
            output_file_id TEXT,
            error_file_id TEXT,
            in_progress_at DOUBLE PRECISION,
            finalizing_at DOUBLE PRECISION,
            completed_at DOUBLE PRECISION,
            failed_at DOUBLE PRECISION,
            expired_at DOUBLE PRECISION,
            cancelling_at DOUBLE PRECISION,
            cancelled_at DOUBLE PRECISION
        )""",
        "CREATE INDEX batches_key ON batches (key_id, created_at)",
        "CREATE INDEX batches_status ON batches (status)",
        """CREATE TABLE batch_lines (
            batch_id TEXT NOT NULL,
            line BIGINT NOT NULL,
            custom_id TEXT NOT NULL,
            status_code INTEGER NOT NULL,
            body TEXT,
            error_code TEXT,
            error_message TEXT,
            request_id TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (batch_id, line)
        )""",
    ]),
]

LATEST = MIGRATIONS[-1][0]
