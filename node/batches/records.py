"""Files and batches as the node keeps them, their states, and their OpenAI wire shapes.

A batch moves through OpenAI's statuses; each move is checked against `TRANSITIONS`, so a
finished batch never runs again and a cancelled one never completes.
"""

from __future__ import annotations

import builtins
import json
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class BatchStatus(str, Enum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


S = BatchStatus
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset({S.FAILED, S.IN_PROGRESS, S.CANCELLING}),
    S.IN_PROGRESS: frozenset({S.FINALIZING, S.CANCELLING, S.EXPIRED}),
    S.FINALIZING: frozenset({S.COMPLETED, S.EXPIRED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.FAILED: frozenset(), S.COMPLETED: frozenset(), S.EXPIRED: frozenset(), S.CANCELLED: frozenset(),
}
FINAL = frozenset({S.FAILED, S.COMPLETED, S.EXPIRED, S.CANCELLED})
# The statuses a running node owns: it resumes them after a restart.
ACTIVE = frozenset({S.IN_PROGRESS, S.FINALIZING, S.CANCELLING})
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}
WINDOWS = {"24h": 86400.0}


class BadTransition(Exception):
    """A status change the state table does not allow (a bug, or a race another writer won)."""


def new_id(prefix: str) -> str:
    """`file-…` / `batch_…`: OpenAI's id shapes, random (never guessable across keys)."""
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass
class FileRecord:
    """A stored file: its bytes live under data_dir/files/<id>, its facts in the database."""

    id: str
    key_id: str | None
    team: str | None
    purpose: str
    filename: str
    bytes: int
    lines: int
    created_at: float
    kind: str = "upload"          # upload | output | error: outputs are written by the node for a batch

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at),
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}

    def wire_json(self) -> builtins.bytes:
        return json.dumps(self.wire()).encode()


@dataclass
class BatchRecord:
    """One batch: who owns it, what it runs, where it stands."""

    id: str
    key_id: str | None
    team: str | None
    input_file_id: str
    endpoint: str
    completion_window: str
    status: BatchStatus
    created_at: float
    expires_at: float
    metadata: dict[str, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None

    def move(self, to: BatchStatus, now: float) -> None:
        """Change status as the table allows, stamping the time OpenAI names after it."""
        if to not in TRANSITIONS[self.status]:
            raise BadTransition(f"batch {self.id}: {self.status.value} -> {to.value} is not a transition")
        self.status = to
        stamp = f"{to.value}_at"
        if hasattr(self, stamp):
            setattr(self, stamp, now)

    def wire(self) -> dict[str, Any]:
        def t(v: float | None) -> int | None:
            return int(v) if v is not None else None
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status.value, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": int(self.created_at), "in_progress_at": t(self.in_progress_at),
            "expires_at": t(self.expires_at), "finalizing_at": t(self.finalizing_at),
            "completed_at": t(self.completed_at), "failed_at": t(self.failed_at), "expired_at": t(self.expired_at),
            "cancelling_at": t(self.cancelling_at), "cancelled_at": t(self.cancelled_at),
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata or None,
        }

    def wire_json(self) -> bytes:
        return json.dumps(self.wire()).encode()


@dataclass(frozen=True)
class LineResult:
    """What one input line produced, recorded once (the database refuses a second record of a line)."""

    batch_id: str
    line: int                      # 0-based position in the input file
    custom_id: str
    status_code: int               # the answer's HTTP status; 0 when the line never reached a model
    body: str | None               # the answer's JSON body, when there was one
    error_code: str | None         # set when the line failed without an answer (expired, cancelled, budget)
    error_message: str | None
    request_id: str
    ts: float

    @property
    def ok(self) -> bool:
        return self.error_code is None and 200 <= self.status_code < 300

    def output_line(self) -> bytes:
        """The line in OpenAI's output (or error) file format."""
        if self.error_code is not None:
            out: dict[str, Any] = {"id": f"batch_req_{self.request_id}", "custom_id": self.custom_id,
                                   "response": None,
                                   "error": {"code": self.error_code, "message": self.error_message}}
        else:
            try:
                body = json.loads(self.body) if self.body else None
            except ValueError:
                body = {"raw": self.body}
            out = {"id": f"batch_req_{self.request_id}", "custom_id": self.custom_id,
                   "response": {"status_code": self.status_code, "request_id": self.request_id, "body": body},
                   "error": None}
        return json.dumps(out, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"
