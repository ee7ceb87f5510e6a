"""Files and batches as their owners see them: who may see what, what is created, what is refused.

An owner is an API key (sees its own), a team (a team token: its team's) or everyone (an
admin token). Something another owner holds is "not found", never "forbidden": ids do not
leak across keys.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from node.batches.files import FileStore
from node.batches.lines import Limits
from node.batches.records import ACTIVE, ENDPOINTS, FINAL, WINDOWS, BatchRecord, BatchStatus, FileRecord, new_id
from node.batches.runner import BatchRunner, BatchStore
from node.errors import InvalidRequest, NotFound

MAX_METADATA_KEYS = 16        # OpenAI's limits on a batch's metadata
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_FILENAME = 255
PURPOSES = ("batch",)


@dataclass(frozen=True)
class Owner:
    """Whose files and batches a caller sees: a key's, a team's, or (both None) everyone's."""

    key_id: str | None
    team: str | None

    def sees(self, key_id: str | None, team: str | None) -> bool:
        if self.key_id is not None:
            return key_id == self.key_id
        if self.team is not None:
            return team == self.team
        return True


def _text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", param=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"'{name}' is not valid UTF-8 text", param=name) from None
    if len(value) > limit or any(ord(c) < 32 for c in value):
        raise InvalidRequest(f"'{name}' must be at most {limit} printable characters", param=name)
    return value


class Batches:
    """The Files and Batches API's operations (HTTP in node/batches/api.py, admin in node/admin/)."""

    def __init__(self, store: BatchStore, files: FileStore, runner: BatchRunner, limits: Limits) -> None:
        self.store, self.files, self.runner, self.limits = store, files, runner, limits

    # -- files -------------------------------------------------------------------
    async def upload(self, key_id: str | None, team: str | None, filename: str, purpose: str,
                     data: bytes) -> FileRecord:
        if purpose not in PURPOSES:
            raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
        filename = _text(filename or "upload.jsonl", "filename", MAX_FILENAME)
        if len(data) > self.limits.max_file_bytes:
            raise InvalidRequest(f"the file is larger than {self.limits.max_file_bytes} bytes", param="file",
                                 code="file_too_large")
        fid = new_id("file-")
        size = await asyncio.to_thread(self.files.write, fid, (data,))
        record = FileRecord(fid, key_id, team, purpose, filename, size, data.count(b"\n") + (not data.endswith(b"\n")),
                            self.runner.clock())
        try:
            await asyncio.to_thread(self.store.insert_file, record)
        except BaseException:
            await asyncio.to_thread(self.files.delete, fid)
            raise
        return record

    async def file(self, owner: Owner, file_id: str) -> FileRecord:
        record = await asyncio.to_thread(self.store.get_file, file_id) if len(file_id) <= 64 else None
        if record is None or not owner.sees(record.key_id, record.team):
            raise NotFound(f"no such file: {file_id[:64]}", param="file_id", code="file_not_found")
        return record

    async def list_files(self, owner: Owner, purpose: str | None, after: str | None, limit: int) -> list[FileRecord]:
        return await asyncio.to_thread(self.store.list_files, owner.key_id, owner.team, purpose,
                                       after, limit)

    async def content(self, owner: Owner, file_id: str) -> Path:
        record = await self.file(owner, file_id)
        return self.files.path(record.id)

    async def delete(self, owner: Owner, file_id: str) -> FileRecord:
        record = await self.file(owner, file_id)
        active = await asyncio.to_thread(self.store.list_batches, record.key_id, None, None, 1000,
                                         (BatchStatus.VALIDATING, *ACTIVE))
        if any(b.input_file_id == record.id for b in active):
            raise InvalidRequest("the file is the input of a batch that is still running; cancel it first",
                                 param="file_id", code="file_in_use")
        await asyncio.to_thread(self.store.delete_file, record.id)
        await asyncio.to_thread(self.files.delete, record.id)
        return record

    # -- batches -----------------------------------------------------------------
    async def create(self, key_id: str | None, team: str | None, body: dict) -> BatchRecord:
        owner = Owner(key_id, None)
        fid = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        metadata = body.get("metadata") or {}
        if not isinstance(fid, str) or not fid:
            raise InvalidRequest("'input_file_id' is required", param="input_file_id")
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        if window not in WINDOWS:
            raise InvalidRequest(f"'completion_window' must be one of {', '.join(WINDOWS)}", param="completion_window")
        if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_KEYS:
            raise InvalidRequest(f"'metadata' must be an object of at most {MAX_METADATA_KEYS} keys", param="metadata")
        for k, v in metadata.items():
            _text(k, "metadata", MAX_METADATA_KEY)
            _text(v, "metadata", MAX_METADATA_VALUE)
        source = await self.file(owner, fid)
        if source.purpose != "batch" or source.kind != "upload":
            raise InvalidRequest("the input file must be a file uploaded with purpose \"batch\"", param="input_file_id")
        now = self.runner.clock()
        batch = BatchRecord(new_id("batch_"), key_id, team, fid, endpoint, window, BatchStatus.VALIDATING, now,
                            now + WINDOWS[window], metadata=dict(metadata))
        await asyncio.to_thread(self.store.insert_batch, batch)
        self.runner.submit(batch)
        return batch

    async def batch(self, owner: Owner, batch_id: str) -> BatchRecord:
        record = await asyncio.to_thread(self.store.get_batch, batch_id) if len(batch_id) <= 64 else None
        if record is None or not owner.sees(record.key_id, record.team):
            raise NotFound(f"no such batch: {batch_id[:64]}", param="batch_id", code="batch_not_found")
        return record

    async def list(self, owner: Owner, after: str | None, limit: int) -> list[BatchRecord]:
        return await asyncio.to_thread(self.store.list_batches, owner.key_id, owner.team, after, limit)

    async def cancel(self, owner: Owner, batch_id: str) -> BatchRecord:
        record = await self.batch(owner, batch_id)
        if record.status in FINAL:
            raise InvalidRequest(f"the batch is already {record.status.value}", param="batch_id",
                                 code="batch_not_cancellable")
        return await self.runner.cancel(record)
