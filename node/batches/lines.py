"""A batch's input file: checked whole before anything runs, then read back one line at a time.

Work is linear in the file and bounded (`Limits`); a failed check lists errors as OpenAI's
batch `errors` do (code, message, param, 1-based line), at most `MAX_ERRORS` of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_ERRORS = 100
MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class Limits:
    """What one batch may hold (`[batches]` in appliance.toml)."""

    max_file_bytes: int = 16 * 1024 * 1024
    max_lines: int = 50_000
    max_line_bytes: int = 1024 * 1024


@dataclass
class Checked:
    """The outcome of checking an input file against a batch's endpoint."""

    lines: int = 0
    models: set[str] = field(default_factory=set)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error(self, code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


@dataclass(frozen=True)
class Line:
    """One input line, ready to run."""

    index: int          # 0-based
    custom_id: str
    body: dict[str, Any]


def _valid_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def check(path: Path, url: str, limits: Limits, model_problem: Callable[[str], str | None]) -> Checked:
    """Check every line of the file at `path` for a batch on `url`; blocking (run it in a thread)."""
    out = Checked()
    seen: set[str] = set()
    if path.stat().st_size > limits.max_file_bytes:
        out.error("file_too_large", f"the input file is larger than {limits.max_file_bytes} bytes")
        return out
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            out.lines += 1
            if out.lines > limits.max_lines:
                out.error("too_many_requests", f"a batch holds at most {limits.max_lines} requests", n)
                return out
            if len(raw) > limits.max_line_bytes:
                out.error("line_too_large", f"a line is at most {limits.max_line_bytes} bytes", n)
                continue
            doc = _parse(raw)
            if not isinstance(doc, dict):
                out.error("invalid_json_line", "this line is not a JSON object (UTF-8)", n)
                continue
            cid = doc.get("custom_id")
            if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID or not _valid_text(cid):
                out.error("invalid_custom_id", f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} "
                          "characters", n, "custom_id")
                continue
            if cid in seen:
                out.error("duplicate_custom_id", f"the custom_id '{cid[:64]}' appears more than once", n, "custom_id")
                continue
            seen.add(cid)
            if doc.get("method") != "POST":
                out.error("invalid_method", "method must be \"POST\"", n, "method")
            if doc.get("url") != url:
                out.error("mismatched_endpoint", f"url must be the batch's endpoint, {url}", n, "url")
            body = doc.get("body")
            if not isinstance(body, dict):
                out.error("invalid_body", "body must be a JSON object", n, "body")
                continue
            if body.get("stream") is True:
                out.error("invalid_body", "batch requests are not streamed; remove \"stream\": true", n, "body.stream")
            model = body.get("model")
            if not isinstance(model, str) or not model or not _valid_text(model):
                out.error("invalid_model", "body.model is required", n, "body.model")
                continue
            if model not in out.models:
                problem = model_problem(model)
                if problem:
                    out.error("model_not_allowed", problem, n, "body.model")
                    continue
                out.models.add(model)
    if out.lines == 0 and not out.errors:
        out.error("empty_file", "the input file holds no requests")
    return out


def read(path: Path) -> Generator[Line, None, None]:
    """The lines of a checked file, in order (blank lines skipped, as the check skipped them)."""
    index = 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            doc = json.loads(raw.decode("utf-8"))
            yield Line(index, doc["custom_id"], doc["body"])
            index += 1
