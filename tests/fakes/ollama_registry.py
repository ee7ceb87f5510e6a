"""A local stand-in for an Ollama registry: the Docker distribution v2 pull API.

Follows the OCI distribution spec (https://github.com/opencontainers/distribution-spec/
blob/main/spec.md, "Pull") as registry.ollama.ai serves it to `ollama pull`:
- `GET /v2/` -> 200.
- `GET|HEAD /v2/<name>/manifests/<reference>` by tag or by `sha256:<hex>` digest, with
  `Content-Type` the manifest's media type and `Docker-Content-Digest`; unknown ->
  404 `{"errors": [{"code": "MANIFEST_UNKNOWN", ...}]}`.
- `GET|HEAD /v2/<name>/blobs/sha256:<hex>` -> 307 to a storage URL (registry.ollama.ai
  redirects blob downloads to its CDN), which serves the bytes with Range.
With `token_auth`, /v2/ routes answer 401 with `WWW-Authenticate: Bearer realm=...,
service=...` and accept a token from `GET <realm>?service=&scope=` (the Docker registry
token authentication spec, https://distribution.github.io/distribution/spec/auth/token/).
Manifests are written the way Ollama writes them (Go `json.Marshal`: compact, fields
schemaVersion, mediaType, config, layers; each layer mediaType, digest, size).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from urllib.parse import parse_qs, urlsplit

from tests.fakes.faulty_http import FaultyHandler, FaultyServer

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG = "application/vnd.docker.container.image.v1+json"
ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")


def layer(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}


class FakeRegistry(FaultyServer):
    """The registry on 127.0.0.1; `push()` publishes a model under a tag."""

    def __init__(self, token_auth: bool = False) -> None:
        super().__init__(_RegistryHandler)
        self.token_auth = token_auth
        self.issued: set[str] = set()
        self.manifests: dict[tuple[str, str], bytes] = {}  # (repository, tag or sha256:hex) -> bytes
        self.blobs: dict[str, bytes] = {}

    def push(self, repository: str, tag: str, layers: list[tuple[str, bytes]], config: bytes | None = None) -> str:
        """Publish `layers` (media type, bytes) as repository:tag; returns the manifest digest hex."""
        config = config if config is not None else json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
        for _, data in [(CONFIG, config), *layers]:
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        doc = {"schemaVersion": 2, "mediaType": MANIFEST_V2, "config": layer(CONFIG, config),
               "layers": [layer(mt, data) for mt, data in layers]}
        raw = json.dumps(doc, separators=(",", ":")).encode()
        hexd = hashlib.sha256(raw).hexdigest()
        self.manifests[(repository, tag)] = raw
        self.manifests[(repository, f"sha256:{hexd}")] = raw
        self.blobs[hexd] = raw  # the manifest is content-addressed too (for fault injection)
        return hexd


class _RegistryHandler(FaultyHandler):
    server: FakeRegistry

    def _authorized(self) -> bool:
        auth = self.headers.get("authorization", "")
        return auth.startswith("Bearer ") and auth.removeprefix("Bearer ") in self.server.issued

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.server.record(self)
        url = urlsplit(self.path)
        path = url.path
        if path == "/token":
            q = parse_qs(url.query)
            token = secrets.token_hex(8)
            self.server.issued.add(token)
            self.send_json(200, json.dumps({"token": token, "scope": q.get("scope", [""])[0], "expires_in": 300}).encode())
            return
        if self.server.token_auth and not path.startswith("/storage/") and not self._authorized():
            m = ROUTE.match(path)
            scope = f',scope="repository:{m["name"]}:pull"' if m else ""
            self.send_json(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                           {"www-authenticate": f'Bearer realm="{self.server.url}/token",service="fake-registry"{scope}'})
            return
        if path in ("/v2", "/v2/"):
            self.send_json(200, b"{}")
            return
        if path.startswith("/storage/"):
            hexd = path.removeprefix("/storage/")
            if hexd in self.server.blobs:
                self.send_blob(hexd, self.server.blobs[hexd])
            else:
                self.send_json(404, b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
            return
        m = ROUTE.match(path)
        if not m:
            self.send_json(404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"not found"}]}')
            return
        name, kind, ref = m["name"], m["kind"], m["ref"]
        if kind == "manifests":
            raw = self.server.manifests.get((name, ref))
            if raw is None:
                self.send_json(404, json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                                                            "detail": {"name": name, "reference": ref}}]}).encode())
                return
            hexd = hashlib.sha256(raw).hexdigest()
            self.send_blob(hexd, raw, {"docker-content-digest": f"sha256:{hexd}"}, content_type=MANIFEST_V2)
            return
        hexd = ref.removeprefix("sha256:")
        if not ref.startswith("sha256:") or hexd not in self.server.blobs:
            self.send_json(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}')
            return
        self.send_response(307)
        self.send_header("location", f"{self.server.url}/storage/{hexd}")
        self.send_header("content-length", "0")
        self.end_headers()
