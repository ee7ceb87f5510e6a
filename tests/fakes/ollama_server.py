"""Stand-in for the `ollama` executable: `ollama serve` and `ollama --version`.

Follows Ollama's documentation (docs.ollama.com: API reference, FAQ "How do I configure
Ollama server?", OpenAI compatibility) and its cobra CLI: `serve` takes no arguments
("Error: accepts 0 arg(s), received 1") and no flags but -h ("Error: unknown flag:
--x"), both exit 1, as does an unknown command; `--version` without a server warns
"could not connect to a running Ollama instance" and prints the client version, exit 0.
The server listens on OLLAMA_HOST (default 127.0.0.1:11434) and reads models from
OLLAMA_MODELS (manifests/<registry>/<namespace>/<model>/<tag> and blobs/sha256-<hex>).

Routes: `GET /` ("Ollama is running"), `GET /api/version`, `GET /api/tags`,
`POST /api/generate` (no prompt: load the model and keep it for `keep_alive`, where -1
means forever and 0 unloads; with a prompt: generate, NDJSON stream by default),
`GET /api/ps` (loaded models with `expires_at`), and the OpenAI routes under `/v1`
(`/v1/models` lists every local model as NAME:TAG; a /v1 request loads its model for
OLLAMA_KEEP_ALIVE, default 5m). Loading checks that the model's blob exists, and takes
FAKE_RUNTIME_LOAD_DELAY_S; the other FAKE_RUNTIME_* knobs of runtime_http apply too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # runtime_http sits beside this file
from runtime_http import Behaviour, Handler, Runtime, add_openai_routes, serve  # noqa: E402

VERSION = "0.12.6"
DEFAULT_REGISTRY = "registry.ollama.ai"
MODEL_MEDIA = "application/vnd.ollama.image.model"
FOREVER = datetime(2318, 1, 1, tzinfo=UTC)  # how Ollama shows keep_alive=-1


def local_models(root: Path) -> dict[str, dict]:
    """NAME:TAG -> manifest (plus its digest), as Ollama names them."""
    found: dict[str, dict] = {}
    base = root / "manifests"
    for f in sorted(base.glob("*/*/*/*")):
        if not f.is_file():
            continue
        host, ns, model, tag = f.relative_to(base).parts
        if host == DEFAULT_REGISTRY:
            name = f"{model}:{tag}" if ns == "library" else f"{ns}/{model}:{tag}"
        else:
            name = f"{host}/{ns}/{model}:{tag}"
        raw = f.read_bytes()
        try:
            manifest = json.loads(raw)
        except ValueError:
            continue
        found[name] = {**manifest, "_digest": hashlib.sha256(raw).hexdigest(), "_mtime": f.stat().st_mtime}
    return found


def keep_alive_s(value: object, default: float) -> float | None:
    """Seconds to keep a model, None for forever (negative), from Ollama's number or "5m" forms."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return None if value < 0 else float(value)
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?", str(value).strip())
    if not m:
        raise ValueError(f"time: invalid duration \"{value}\"")
    n = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return None if n < 0 else n


class Ollama:
    """The server's state: models on disk, and which are loaded until when."""

    def __init__(self, root: Path, rt: Runtime) -> None:
        self.root, self.rt = root, rt
        self.loaded: dict[str, float | None] = {}   # name -> expiry (monotonic), None = forever
        self.lock = threading.Lock()
        self.default_keep = keep_alive_s(os.environ.get("OLLAMA_KEEP_ALIVE") or "5m", 300)

    def find(self, name: str) -> tuple[str, dict] | None:
        models = local_models(self.root)
        full = name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
        return (full, models[full]) if full in models else None

    def load(self, name: str, manifest: dict, keep: float | None) -> str | None:
        """Load (or refresh) a model; the error text when its blob is missing."""
        layer = next((x for x in manifest.get("layers", []) if x.get("mediaType") == MODEL_MEDIA), None)
        if layer is None or not (self.root / "blobs" / layer["digest"].replace(":", "-")).is_file():
            return f"model '{name}' has no model blob under {self.root / 'blobs'}"
        with self.lock:
            fresh = name not in self.loaded
        if fresh:
            time.sleep(float(os.environ.get("FAKE_RUNTIME_LOAD_DELAY_S") or 0))
        with self.lock:
            self.loaded[name] = None if keep is None else time.monotonic() + keep
        return None

    def running(self) -> dict[str, float | None]:
        now = time.monotonic()
        with self.lock:
            for n, exp in list(self.loaded.items()):
                if exp is not None and exp <= now:
                    del self.loaded[n]
            return dict(self.loaded)


def _size(manifest: dict) -> int:
    return sum(int(x.get("size", 0)) for x in manifest.get("layers", []))


def routes_for(o: Ollama) -> dict:
    def not_found_api(h: Handler, name: str) -> None:
        h.send_json(404, {"error": f"model '{name}' not found"})

    def not_found_v1(h: Handler, name: str) -> None:
        h.send_json(404, {"error": {"message": f"model \"{name}\" not found, try pulling it first",
                                    "type": "api_error", "param": None, "code": None}})

    def tags(h: Handler) -> None:
        h.send_json(200, {"models": [
            {"name": n, "model": n, "modified_at": datetime.fromtimestamp(m["_mtime"], UTC).isoformat(),
             "size": _size(m), "digest": m["_digest"], "details": {"format": "gguf"}}
            for n, m in local_models(o.root).items()]})

    def ps(h: Handler) -> None:
        models = local_models(o.root)
        out = []
        for n, exp in o.running().items():
            until = FOREVER if exp is None else datetime.now(UTC) + timedelta(seconds=exp - time.monotonic())
            m = models.get(n, {})
            out.append({"name": n, "model": n, "size": _size(m), "digest": m.get("_digest", ""), "details": {"format": "gguf"},
                        "expires_at": until.isoformat(), "size_vram": 0})
        h.send_json(200, {"models": out})

    def generate(h: Handler) -> None:
        body = h.body()
        name = str(body.get("model") or "")
        if not name:
            h.send_json(400, {"error": "model is required"})
            return
        found = o.find(name)
        if found is None:
            not_found_api(h, name)
            return
        full, manifest = found
        try:
            keep = o.default_keep if body.get("keep_alive") is None else keep_alive_s(body["keep_alive"], 0)
        except ValueError as exc:
            h.send_json(400, {"error": str(exc)})
            return
        now = datetime.now(UTC).isoformat()
        if keep == 0 and not body.get("prompt"):
            with o.lock:
                o.loaded.pop(full, None)
            h.send_json(200, {"model": full, "created_at": now, "response": "", "done": True, "done_reason": "unload"})
            return
        problem = o.load(full, manifest, keep)
        if problem:
            h.send_json(500, {"error": problem})
            return
        if not body.get("prompt"):
            h.send_json(200, {"model": full, "created_at": now, "response": "", "done": True, "done_reason": "load"})
            return
        words = ["fake", "ollama", "words"]
        final = {"model": full, "created_at": now, "response": "", "done": True, "done_reason": "stop",
                 "prompt_eval_count": len(str(body["prompt"]).split()), "eval_count": len(words)}
        if body.get("stream") is False:
            h.send_json(200, {**final, "response": " ".join(words)})
            return
        h.start_stream("application/x-ndjson")
        for w in words:
            h.chunk(json.dumps({"model": full, "created_at": now, "response": w + " ", "done": False}).encode() + b"\n")
        h.chunk(json.dumps(final).encode() + b"\n")
        h.end_stream()

    def v1(inner):
        """A /v1 route that loads its model first, as Ollama's scheduler does."""
        def route(h: Handler) -> None:
            found = o.find(str(h.body().get("model") or ""))
            if found is not None:
                problem = o.load(found[0], found[1], o.default_keep)
                if problem:
                    h.send_json(500, {"error": {"message": problem, "type": "api_error", "param": None, "code": None}})
                    return
            inner(h)
        return route

    def health(h: Handler) -> None:
        if not o.rt.healthy():
            h.send_json(503, {"error": "server unavailable"})
        else:
            h.send_json(200, {"version": VERSION})

    routes: dict = {("GET", "/"): lambda h: h.send_bytes(200, b"Ollama is running"),
                    ("HEAD", "/"): lambda h: h.send_bytes(200, b"Ollama is running"),
                    ("GET", "/api/version"): health, ("GET", "/api/tags"): tags, ("GET", "/api/ps"): ps,
                    ("POST", "/api/generate"): generate}
    add_openai_routes(routes, not_found_v1)
    for key in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings")):
        routes[key] = v1(routes[key])
    return routes


def _host_port(value: str) -> tuple[str, int]:
    value = value.split("://", 1)[-1].rstrip("/") or "127.0.0.1"
    host, sep, port = value.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() else (value, 11434)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-v"]):
        print("Warning: could not connect to a running Ollama instance", file=sys.stderr)
        print(f"Warning: client version is {VERSION}", file=sys.stderr)
        return 0
    if not args or args[0] != "serve":
        if args and not args[0].startswith("-"):
            print(f'Error: unknown command "{args[0]}" for "ollama"', file=sys.stderr)
        elif args:
            print(f"Error: unknown flag: {args[0]}", file=sys.stderr)
        else:
            print("Usage:\n  ollama [flags]\n  ollama [command]", file=sys.stderr)
        return 1
    rest = args[1:]
    flags = [a for a in rest if a.startswith("-")]
    if flags and flags[0] not in ("-h", "--help"):
        print(f"Error: unknown flag: {flags[0].split('=')[0]}", file=sys.stderr)
        return 1
    if flags:
        print("Start ollama\n\nUsage:\n  ollama serve [flags]\n\nEnvironment Variables:\n      OLLAMA_HOST ...")
        return 0
    if rest:
        print(f"Error: accepts 0 arg(s), received {len(rest)}", file=sys.stderr)
        return 1
    host, port = _host_port(os.environ.get("OLLAMA_HOST", ""))
    root = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    rt = Runtime("ollama", Behaviour.from_env(), owned_by="library")
    o = Ollama(root, rt)
    rt.models = lambda: list(local_models(root))
    rt.log(f'time={datetime.now(UTC).isoformat()} level=INFO msg="Listening on {host}:{port} (version {VERSION})"')
    return serve(rt, host, port, routes_for(o), bind_after_load=False)


if __name__ == "__main__":
    sys.exit(main())
