"""SQL for admin tokens, plans and the audit log (a part of SqlStorage)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields, replace
from typing import Any

from node.accounts.audit import GENESIS, AuditRecord, chain_hash
from node.accounts.plans import PlanRecord
from node.accounts.tokens import TokenRecord

TOKEN_COLUMNS = [f.name for f in fields(TokenRecord)]
PLAN_COLUMNS = [f.name for f in fields(PlanRecord)]
AUDIT_COLUMNS = [f.name for f in fields(AuditRecord)]
# Any constant: appends from every node on one PostgreSQL database take this lock in turn.
AUDIT_LOCK = 7_263_001


def _token_params(r: TokenRecord) -> list[Any]:
    return [int(v) if n == "revoked" else v for n, v in ((n, getattr(r, n)) for n in TOKEN_COLUMNS)]


def _row_to_token(row: dict[str, Any]) -> TokenRecord:
    return TokenRecord(**{**row, "revoked": bool(row["revoked"])})


def _plan_params(r: PlanRecord) -> list[Any]:
    out = []
    for n in PLAN_COLUMNS:
        v = getattr(r, n)
        if n == "models":
            v = json.dumps(list(v)) if v is not None else None
        elif n == "metadata":
            v = json.dumps(v)
        out.append(v)
    return out


def _row_to_plan(row: dict[str, Any]) -> PlanRecord:
    row = dict(row)
    row["models"] = tuple(json.loads(row["models"])) if row["models"] is not None else None
    row["metadata"] = json.loads(row["metadata"] or "{}")
    return PlanRecord(**row)


def _row_to_audit(row: dict[str, Any]) -> AuditRecord:
    return AuditRecord(**{**row, "seq": int(row["seq"]), "changes": json.loads(row["changes"])})


class GovernanceTables:
    """Tokens, plans and audit on the SqlStorage backend (mixed into SqlStorage)."""

    backend: Any

    # Provided by SqlStorage, which mixes this class in.
    _sql: Any
    _guard: Any
    _write_setting: Any

    # -- admin tokens --------------------------------------------------------------
    def insert_token(self, record: TokenRecord) -> None:
        cols = ", ".join(TOKEN_COLUMNS)
        marks = ", ".join("?" for _ in TOKEN_COLUMNS)
        self._write_setting(f"INSERT INTO admin_tokens ({cols}) VALUES ({marks})", _token_params(record))

    def save_token(self, record: TokenRecord) -> None:
        sets = ", ".join(f"{c} = ?" for c in TOKEN_COLUMNS if c != "id")
        params = _token_params(record)
        self._write_setting(f"UPDATE admin_tokens SET {sets} WHERE id = ?", params[1:] + [record.id])

    def list_tokens(self) -> list[TokenRecord]:
        with self._guard():
            return [_row_to_token(r) for r in self.backend.query("SELECT * FROM admin_tokens ORDER BY created_at")]

    # -- plans ---------------------------------------------------------------------
    def insert_plan(self, record: PlanRecord) -> None:
        cols = ", ".join(PLAN_COLUMNS)
        marks = ", ".join("?" for _ in PLAN_COLUMNS)
        self._write_setting(f"INSERT INTO plans ({cols}) VALUES ({marks})", _plan_params(record))

    def save_plan(self, record: PlanRecord) -> None:
        sets = ", ".join(f"{c} = ?" for c in PLAN_COLUMNS if c != "name")
        params = _plan_params(record)
        self._write_setting(f"UPDATE plans SET {sets} WHERE name = ?", params[1:] + [record.name])

    def delete_plan(self, name: str) -> bool:
        return self._write_setting("DELETE FROM plans WHERE name = ?", [name]) > 0

    def list_plans(self) -> list[PlanRecord]:
        with self._guard():
            return [_row_to_plan(r) for r in self.backend.query("SELECT * FROM plans ORDER BY name")]

    # -- audit -----------------------------------------------------------------------
    def append_audit(self, record: AuditRecord) -> AuditRecord:
        """Append one record after the current head; seq, prev_hash and hash are set here.

        Appends are serialized (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock held
        to the end of the transaction), so two nodes never link to the same head.
        """
        with self._guard():
            with self.backend.transaction() as tx:
                if self.backend.name == "postgresql":
                    tx.query(self._sql("SELECT pg_advisory_xact_lock(?) AS locked"), (AUDIT_LOCK,))
                head = tx.query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
                seq, prev = (int(head[0]["seq"]) + 1, head[0]["hash"]) if head else (1, GENESIS)
                record = replace(record, seq=seq, prev_hash=prev, hash="")
                record = replace(record, hash=chain_hash(prev, record))
                cols = ", ".join(AUDIT_COLUMNS)
                marks = ", ".join("?" for _ in AUDIT_COLUMNS)
                values = [json.dumps(record.changes, sort_keys=True, default=str) if n == "changes" else getattr(record, n)
                          for n in AUDIT_COLUMNS]
                tx.execute(self._sql(f"INSERT INTO audit ({cols}) VALUES ({marks})"), values)
        return record

    def list_audit(self, since: float | None = None, until: float | None = None, actor: str | None = None,
                   action: str | None = None, limit: int = 1000, offset: int = 0,
                   newest_first: bool = False) -> list[AuditRecord]:
        """Records in seq order (or newest first), filtered; an `action` ending in '.' matches every action it starts."""
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if until is not None:
            where.append("ts < ?")
            params.append(until)
        if actor is not None:
            where.append("actor_id = ?")
            params.append(actor)
        if action is not None:
            if action.endswith("."):
                where.append(f"substr(action, 1, {len(action)}) = ?")
                params.append(action)
            else:
                where.append("action = ?")
                params.append(action)
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY seq" + (" DESC" if newest_first else "") + " LIMIT ? OFFSET ?"
        params += [limit, offset]
        with self._guard():
            return [_row_to_audit(r) for r in self.backend.query(self._sql(sql), params)]

    def iter_audit(self, batch: int = 1000) -> Iterator[AuditRecord]:
        """Every record in seq order, a batch at a time (for verify)."""
        after = 0
        while True:
            with self._guard():
                rows = self.backend.query(self._sql("SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?"),
                                          (after, batch))
            for r in rows:
                yield _row_to_audit(r)
            if len(rows) < batch:
                return
            after = int(rows[-1]["seq"])
