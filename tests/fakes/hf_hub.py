"""A local stand-in for the Hugging Face Hub: the subset `infernode lock` and `pull` use.

Follows the Hub HTTP API as documented at https://huggingface.co/docs/hub/api and as
`huggingface_hub.HfApi.model_info` calls it:
- `GET /api/models/{repo}/revision/{rev}?blobs=true` -> `{"id", "sha", "siblings": [
  {"rfilename", "size", "blobId", "lfs": {"sha256", "size", "pointerSize"}}]}`; an unknown
  repo (or a private one asked anonymously) answers 401 with `X-Error-Code: RepoNotFound`, an unknown revision 404 with
  `X-Error-Code: RevisionNotFound` (what `hf_raise_for_status` maps to its errors).
- `GET|HEAD /{repo}/resolve/{rev}/{path}`: small (git) files are served directly with
  `X-Repo-Commit` and `ETag`; LFS files answer 302 to a CDN URL with `X-Linked-Size`
  and `X-Linked-Etag`, as the real Hub redirects to its storage; the CDN honours Range.
With `token` set, the API and resolve routes need `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from tests.fakes.faulty_http import FaultyHandler, FaultyServer

LFS_THRESHOLD = 1024  # files at least this big are LFS files (the real Hub: 10 MB or by .gitattributes)


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)                  # branch/tag -> sha


class FakeHub(FaultyServer):
    """The Hub on 127.0.0.1; `commit()` adds files, `url` is what HF_ENDPOINT points at."""

    def __init__(self, token: str | None = None) -> None:
        super().__init__(_HubHandler)
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.blobs: dict[str, bytes] = {}
        # Where LFS redirects go; another server here makes the CDN a different origin.
        self.cdn_url: str | None = None

    def commit(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        """A new commit of `files` on branch or tag `ref`; returns its 40-hex sha."""
        r = self.repos.setdefault(repo, Repo())
        sha = hashlib.sha1(json.dumps([repo, ref, len(r.commits), sorted(files)]).encode()).hexdigest()
        r.commits[sha] = dict(files)
        r.refs[ref] = sha
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return sha


class _HubHandler(FaultyHandler):
    server: FakeHub

    def _authorized(self) -> bool:
        if self.server.token is None:
            return True
        return self.headers.get("authorization") == f"Bearer {self.server.token}"

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.server.record(self)
        path = unquote(urlsplit(self.path).path)
        if path.startswith("/cdn/"):
            hexd = path.removeprefix("/cdn/")
            if hexd not in self.server.blobs:
                self.send_json(404, b'{"error":"not found"}')
                return
            self.send_blob(hexd, self.server.blobs[hexd], {"etag": f'"{hexd}"'})
            return
        if not self._authorized():
            if self.headers.get("authorization"):
                self.send_json(401, b'{"error":"Invalid credentials in Authorization header"}')
            else:  # the Hub hides private repos from anonymous callers
                self.send_json(401, b'{"error":"Repository not found"}', {"x-error-code": "RepoNotFound"})
            return
        if path.startswith("/api/models/"):
            self._model_info(path.removeprefix("/api/models/"))
        elif "/resolve/" in path:
            repo, _, rest = path.lstrip("/").partition("/resolve/")
            rev, _, file = rest.partition("/")
            self._resolve(repo, rev, file)
        else:
            self.send_json(404, b'{"error":"not found"}')

    def _lookup(self, repo: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        r = self.server.repos.get(repo)
        if r is None:
            self.send_json(401, b'{"error":"Repository not found"}', {"x-error-code": "RepoNotFound"})
            return None
        sha = r.refs.get(rev, rev)
        if sha not in r.commits:
            self.send_json(404, json.dumps({"error": f"Invalid rev id: {rev}"}).encode(),
                           {"x-error-code": "RevisionNotFound"})
            return None
        return sha, r.commits[sha]

    def _model_info(self, rest: str) -> None:
        repo, _, rev = rest.partition("/revision/")
        found = self._lookup(repo, rev or "main")
        if found is None:
            return
        sha, files = found
        siblings = []
        for name, data in sorted(files.items()):
            s: dict = {"rfilename": name, "size": len(data),
                       "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
            if len(data) >= LFS_THRESHOLD:
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        body = {"_id": "fake", "id": repo, "modelId": repo, "sha": sha, "private": False, "disabled": False,
                "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}
        self.send_json(200, json.dumps(body).encode())

    def _resolve(self, repo: str, rev: str, file: str) -> None:
        found = self._lookup(repo, rev)
        if found is None:
            return
        sha, files = found
        data = files.get(file)
        if data is None:
            self.send_json(404, b'{"error":"Entry not found"}', {"x-error-code": "EntryNotFound"})
            return
        hexd = hashlib.sha256(data).hexdigest()
        if len(data) >= LFS_THRESHOLD:
            self.send_response(302)
            self.send_header("location", f"{self.server.cdn_url or self.server.url}/cdn/{hexd}")
            self.send_header("x-repo-commit", sha)
            self.send_header("x-linked-size", str(len(data)))
            self.send_header("x-linked-etag", f'"{hexd}"')
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_blob(hexd, data, {"x-repo-commit": sha, "etag": f'"{hexd}"'})
