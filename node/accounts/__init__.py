"""Who may do what: keys, teams, quotas, the usage ledger and its storage (SQLite, PostgreSQL)."""
