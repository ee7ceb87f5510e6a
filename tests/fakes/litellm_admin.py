"""A stand-in for a LiteLLM proxy's model-management endpoints (the proxy with a database).

Written from LiteLLM's documentation ("Model Management", docs.litellm.ai/docs/proxy/
model_management; the API reference of the proxy) and checked against the source of
litellm 1.106.2 (`litellm/proxy/management_endpoints/model_management_endpoints.py`,
`proxy_server.py: model_info_v1`):

- every route needs `Authorization: Bearer <master key>`; a wrong key is 401 with
  `{"error": {"message": "Authentication Error, ...", "type": "auth_error", "param": "None", "code": "401"}}`;
- `POST /model/new` `{"model_name", "litellm_params": {"model", ...}, "model_info": {"id", ...}}`
  stores a deployment (a random id when none is given); an id already stored fails (400)
  as the database's unique key on `model_id` does;
- `POST /model/update` (same body, `model_info.id` required) replaces one;
  `PATCH /model/{id}/update` merges the given fields; an unknown id is 404 (PATCH) or 400;
- `POST /model/delete` `{"id"}` removes one; an unknown id is 400 "Model with id=... not found in db";
- `GET /model/info` and `GET /v2/model/info` list `{"data": [{"model_name", "litellm_params",
  "model_info": {"id", "db_model": true, ...}}]}` with `api_key` removed, as LiteLLM's
  `remove_sensitive_info_from_deployment` does; `?litellm_model_id=` selects one;
- without a database every write answers 500 `{"error": "No DB Connected. ..."}`.

`stop()` then `start()` on the same port models a proxy that is down and comes back with
its database intact. Every request is recorded in `calls`.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

NO_DB = "No DB Connected. Here's how to do it - https://docs.litellm.ai/docs/proxy/virtual_keys"


def _err(message: str, type_: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": "None", "code": str(code)}}


class LiteLLMAdminFake:
    """The model table and the HTTP server in front of it."""

    def __init__(self, port: int, master_key: str = "sk-master", *, database: bool = True) -> None:
        self.port, self.master_key, self.database = port, master_key, database
        self.models: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiteLLMAdminFake:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self.models)

    # -- requests ------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("content-length") or 0)
        raw = h.rfile.read(length) if length else b""
        with self._lock:
            self.calls.append((method, parts.path))
            status, body = self._route(method, parts.path, parse_qs(parts.query), raw, h.headers.get("authorization", ""))
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str, query: dict[str, list[str]], raw: bytes, auth: str) -> tuple[int, Any]:
        if auth != f"Bearer {self.master_key}":
            return 401, _err("Authentication Error, Invalid proxy server token passed. Received API Key = "
                             f"{auth[7:][:6]}..., Key Hash (Token) =...", "auth_error", 401)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return 422, {"detail": [{"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error"}]}
        if method == "GET" and path in ("/model/info", "/v2/model/info", "/v1/model/info"):
            return self._info(query.get("litellm_model_id", [None])[0])
        if method == "POST" and path == "/model/new":
            return self._new(body)
        if method == "POST" and path == "/model/update":
            return self._update(body)
        if method == "PATCH" and path.startswith("/model/") and path.endswith("/update"):
            return self._patch(path[len("/model/"):-len("/update")], body)
        if method == "POST" and path == "/model/delete":
            return self._delete(body)
        return 404, {"detail": "Not Found"}

    def _public(self, m: dict[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in m["litellm_params"].items() if k != "api_key"}
        return {"model_name": m["model_name"], "litellm_params": params, "model_info": {**m["model_info"], "db_model": True}}

    def _info(self, model_id: str | None) -> tuple[int, Any]:
        if model_id is not None:
            if model_id not in self.models:
                return 400, _err(str({"error": f"Model id = {model_id} not found on litellm proxy"}), "None", 400)
            return 200, {"data": [self._public(self.models[model_id])]}
        return 200, {"data": [self._public(m) for m in self.models.values()]}

    @staticmethod
    def _invalid(body: Any) -> str | None:
        if not isinstance(body, dict) or not isinstance(body.get("model_name"), str):
            return "model_name: Field required"
        params = body.get("litellm_params")
        if not isinstance(params, dict) or not isinstance(params.get("model"), str):
            return "litellm_params.model: Field required"
        return None

    def _new(self, body: Any) -> tuple[int, Any]:
        if not self.database:
            return 500, _err(str({"error": NO_DB}), "auth_error", 500)
        problem = self._invalid(body)
        if problem:
            return 422, {"detail": [{"type": "missing", "loc": ["body", *problem.split(":")[0].split(".")], "msg": problem}]}
        info = dict(body.get("model_info") or {})
        model_id = info.get("id") or str(uuid.uuid4())
        if model_id in self.models:
            return 400, _err("Authentication Error, Unique constraint failed on the fields: (`model_id`)", "auth_error", 400)
        info["id"] = model_id
        self.models[model_id] = {"model_name": body["model_name"], "litellm_params": dict(body["litellm_params"]),
                                 "model_info": info}
        return 200, {"model_id": model_id, "model_name": body["model_name"]}

    def _update(self, body: Any) -> tuple[int, Any]:
        if not self.database:
            return 500, _err(str({"error": NO_DB}), "auth_error", 500)
        model_id = ((body or {}).get("model_info") or {}).get("id")
        if not model_id:
            return 400, _err("Authentication Error, model_info.id not provided", "auth_error", 400)
        if model_id not in self.models:
            return 400, _err("Authentication Error, model not found", "auth_error", 400)
        m = self.models[model_id]
        if body.get("model_name"):
            m["model_name"] = body["model_name"]
        m["litellm_params"] = {**m["litellm_params"], **(body.get("litellm_params") or {})}
        m["model_info"] = {**m["model_info"], **body["model_info"]}
        return 200, {"model_id": model_id, "model_name": m["model_name"]}

    def _patch(self, model_id: str, body: Any) -> tuple[int, Any]:
        if not self.database:
            return 500, _err(str({"error": NO_DB}), "auth_error", 500)
        if model_id not in self.models:
            return 404, _err(f"Model {model_id} not found on proxy.", "not_found_error", 404)
        return self._update({**(body or {}), "model_info": {**((body or {}).get("model_info") or {}), "id": model_id}})

    def _delete(self, body: Any) -> tuple[int, Any]:
        if not self.database:
            return 500, _err(str({"error": NO_DB}), "auth_error", 500)
        model_id = (body or {}).get("id")
        if model_id not in self.models:
            return 400, _err(str({"error": f"Model with id={model_id} not found in db"}), "auth_error", 400)
        del self.models[model_id]
        return 200, {"message": f"Model: {model_id} deleted successfully"}
