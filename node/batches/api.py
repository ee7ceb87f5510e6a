"""The HTTP side of `/v1/files` and `/v1/batches`, in OpenAI's shapes, for API keys.

Bodies are small JSON documents, except a file upload: multipart/form-data, split here in
one linear pass (`multipart`). Uploads get their own body limit (`[batches] max_file_bytes`),
and at most `UploadGate.slots` of them are read at once, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from node.batches.records import FileRecord
from node.batches.service import Batches, Owner
from node.errors import InvalidRequest, NodeError, NotFound
from node.gateway.httpd import Connection, Request

JSON_CT = [(b"content-type", b"application/json")]
MAX_PARTS = 8
MAX_PART_HEAD = 8 * 1024
PAGE_MAX = 10_000
_BOUNDARY = re.compile(rb'boundary="?([^";,\s]{1,200})"?', re.I)
_PARAM = re.compile(rb'\b(name|filename)="([^"\r\n]{0,1024})"', re.I)
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class UploadGate:
    """At most `slots` upload bodies in memory at once; a slot frees when its request is answered,
    or when the server's request deadline has passed (a body that never finished)."""

    def __init__(self, slots: int = 4, hold_s: float = 60.0) -> None:
        self.slots, self.hold_s = slots, hold_s
        self._held: list[float] = []

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self._held = [t for t in self._held if t > now]
        if len(self._held) >= self.slots:
            return False
        self._held.append(now + self.hold_s)
        return True

    def give(self) -> None:
        if self._held:
            self._held.remove(min(self._held))


def multipart(body: bytes, content_type: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename, bytes). Linear; bounded parts."""
    m = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith(b"multipart/form-data") or m is None:
        raise InvalidRequest("send the file as multipart/form-data with a boundary", param="file")
    delim = b"--" + m.group(1)
    fields: dict[str, tuple[str | None, bytes]] = {}
    pos = body.find(delim)
    if pos < 0:
        raise InvalidRequest("the multipart body has no part", param="file")
    while True:
        pos += len(delim)
        if body[pos:pos + 2] == b"--":
            return fields
        if body[pos:pos + 2] != b"\r\n":
            raise InvalidRequest("malformed multipart body", param="file")
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + MAX_PART_HEAD)
        if head_end < 0:
            raise InvalidRequest("malformed multipart part headers", param="file")
        head = body[pos + 2:head_end]
        end = body.find(b"\r\n" + delim, head_end + 4)
        if end < 0:
            raise InvalidRequest("the multipart body is not terminated", param="file")
        params = {k.lower(): v for k, v in _PARAM.findall(head)}
        name = params.get(b"name")
        if name is not None:
            if len(fields) >= MAX_PARTS:
                raise InvalidRequest(f"at most {MAX_PARTS} form fields", param="file")
            filename = params.get(b"filename")
            fields[name.decode("utf-8", "replace")] = (
                filename.decode("utf-8", "replace") if filename is not None else None, body[head_end + 4:end])
        pos = end + 2


def _query(req: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in req.query.decode("latin-1").split("&")[:16]:
        k, _, v = part.partition("=")
        if k:
            out[k] = v[:128]
    return out


def _limit(q: dict[str, str], default: int) -> int:
    raw = q.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= PAGE_MAX:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {PAGE_MAX}", param="limit")
    return int(raw)


def _after(q: dict[str, str]) -> str | None:
    after = q.get("after")
    if after is not None and not _ID.match(after):
        raise InvalidRequest("'after' must be an id from a previous page", param="after")
    return after


def _page(items: list[Any], limit: int) -> bytes:
    data = [i.wire() for i in items[:limit]]
    return json.dumps({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                       "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}).encode()


class BatchApi:
    """Answers `/v1/files…` and `/v1/batches…` for the key the head check authenticated."""

    def __init__(self, batches: Batches, uploads: UploadGate, admit: Any) -> None:
        self.batches, self.uploads = batches, uploads
        self.admit = admit   # (key) -> an Admission, or raises RateLimited: these calls count against rpm

    @staticmethod
    def handles(path: bytes) -> bool:
        return path in (b"/v1/files", b"/v1/batches") or path.startswith((b"/v1/files/", b"/v1/batches/"))

    def head_limit(self, req: Request, max_file_bytes: int) -> int | None:
        """The body limit of an upload (None: the usual one), or 0 when every upload slot is taken."""
        if req.method == "POST" and req.path == b"/v1/files":
            return max_file_bytes + 64 * 1024 if self.uploads.take() else 0
        return None

    async def handle(self, req: Request, conn: Connection, key: Any, rid: bytes) -> None:
        upload = req.method == "POST" and req.path == b"/v1/files"
        try:
            adm = self.admit(key)
            adm.finish(0, 0)
            status, body = await self._route(req, conn, key, rid)
            if body is not None:
                conn.respond(status, JSON_CT + [(b"x-request-id", rid)], body)
        except NodeError as err:
            if not conn.started:
                conn.respond(err.status, JSON_CT + [(b"x-request-id", rid)] +
                             [(k.encode(), v.encode()) for k, v in err.headers.items()], err.body())
        finally:
            if upload:
                self.uploads.give()

    async def _route(self, req: Request, conn: Connection, key: Any, rid: bytes) -> tuple[int, bytes | None]:
        owner = Owner(key.id, None)
        parts = req.path.decode("latin-1").split("/")[2:]   # ["files", id?, "content"?]
        kind, rest = parts[0], parts[1:]
        if rest and not _ID.match(rest[0]):
            raise NotFound(f"no such {kind[:-1]}: {rest[0][:64]}")
        method = req.method
        if kind == "files":
            if not rest and method == "POST":
                return 200, (await self._upload(req, key)).wire_json()
            if not rest and method == "GET":
                q = _query(req)
                limit = _limit(q, 100)
                items = await self.batches.list_files(owner, q.get("purpose") or None, _after(q), limit + 1)
                return 200, _page(items, limit)
            if len(rest) == 1 and method == "GET":
                return 200, (await self.batches.file(owner, rest[0])).wire_json()
            if len(rest) == 1 and method == "DELETE":
                record = await self.batches.delete(owner, rest[0])
                return 200, json.dumps({"id": record.id, "object": "file", "deleted": True}).encode()
            if len(rest) == 2 and rest[1] == "content" and method == "GET":
                await self._content(conn, await self.batches.content(owner, rest[0]), rid)
                return 200, None
        elif kind == "batches":
            if not rest and method == "POST":
                body = _json(req.body)
                return 200, (await self.batches.create(key.id, key.team, body)).wire_json()
            if not rest and method == "GET":
                q = _query(req)
                limit = _limit(q, 20)
                return 200, _page(await self.batches.list(owner, _after(q), limit + 1), limit)
            if len(rest) == 1 and method == "GET":
                return 200, (await self.batches.batch(owner, rest[0])).wire_json()
            if len(rest) == 2 and rest[1] == "cancel" and method == "POST":
                return 200, (await self.batches.cancel(owner, rest[0])).wire_json()
        raise NotFound(f"no route {method} {req.path.decode('latin-1')[:128]}")

    async def _upload(self, req: Request, key: Any) -> FileRecord:
        ctype = next((v for k, v in req.headers if k == b"content-type"), b"")
        fields = multipart(req.body, ctype)
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if "file" not in fields:
            raise InvalidRequest("the form has no 'file' field", param="file")
        filename, data = fields["file"]
        return await self.batches.upload(key.id, key.team, filename or "upload.jsonl", purpose, data)

    async def _content(self, conn: Connection, path: Any, rid: bytes) -> None:
        f = await asyncio.to_thread(path.open, "rb")
        try:
            conn.start(200, [(b"content-type", b"application/octet-stream"), (b"x-request-id", rid)])
            while True:
                chunk = await asyncio.to_thread(f.read, 256 * 1024)
                if not chunk:
                    break
                await conn.write(chunk)
            conn.end()
        finally:
            f.close()


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequest("request body is not valid UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object")
    return doc



