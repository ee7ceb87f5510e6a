"""Network sources: the Hugging Face Hub, Ollama (Docker distribution v2) registries, https.

`resolve` turns a source into a lock entry (commit sha or manifest digest, and every
file's size and sha256); `pull` downloads what a lock entry pins, by that immutable
revision, into the store. Both use the Hub token huggingface-hub itself finds (HF_TOKEN,
then the login saved under HF_HOME) and HF_ENDPOINT (a mirror).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, replace
from urllib.parse import quote

import httpx

from node.config import ModelConfig
from node.errors import StoreError
from node.supply.download import NetSettings, RemoteError, get_with_retries, hash_with_retries
from node.supply.fetchpool import FetchPool
from node.supply.lockfile import LockedFile, LockEntry
from node.supply.manifest import MANIFEST_V2, check_manifest, is_ollama_entry
from node.supply.progress import NullProgress, PullProgress
from node.supply.ranged import FileJob, fetch_file
from node.supply.segments import had
from node.supply.sources import HfSource, OllamaSource, Source, UrlSource, registry_host
from node.supply.store import Store

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class Download:
    """One file to fetch: what the lock pins and where to get it."""

    locked: LockedFile
    url: str
    headers: dict[str, str]
    label: str = ""


# -- Hugging Face Hub ---------------------------------------------------------------
def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_token() -> str | None:
    """The Hub token by huggingface-hub's own lookup: HF_TOKEN, then `hf auth login`'s saved one."""
    from huggingface_hub import get_token
    return get_token()


def hf_headers() -> dict[str, str]:
    token = hf_token()
    return {"authorization": f"Bearer {token}"} if token else {}


def hf_file_url(repo: str, commit: str, path: str) -> str:
    return f"{hf_endpoint()}/{repo}/resolve/{commit}/{quote(path)}"


def resolve_hf(model: ModelConfig, src: HfSource, settings: NetSettings) -> LockEntry:
    """Branch, tag or commit -> commit sha; every selected file's size and sha256."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=hf_endpoint(), token=hf_token() or False)
    where = f"{model.name}: hf:{src.repo}@{src.revision}"
    try:
        info = api.model_info(src.repo, revision=src.revision, files_metadata=True)
    except RevisionNotFoundError:
        raise RemoteError(f"{where}: no branch, tag or commit '{src.revision}' in {src.repo}") from None
    except RepositoryNotFoundError:
        raise RemoteError(f"{where}: repo not found at {hf_endpoint()} (private or gated? set HF_TOKEN or run `hf auth login`)") from None
    except (HfHubHTTPError, httpx.HTTPError) as exc:
        raise RemoteError(f"{where}: {hf_endpoint()}: {str(exc).splitlines()[0]}") from None
    if not info.sha:
        raise RemoteError(f"{where}: the Hub did not return a commit sha")
    files: list[LockedFile] = []
    with settings.client() as client:
        for s in sorted(info.siblings or [], key=lambda s: s.rfilename):
            name = s.rfilename
            if name.startswith(".") or "/." in name:
                continue  # .gitattributes and friends are not model files
            if src.glob and not fnmatch.fnmatch(name, src.glob):
                continue
            if s.lfs is not None:
                files.append(LockedFile(path=name, size=s.lfs.size, sha256=s.lfs.sha256))
            else:  # a small git file: its git oid is not a sha256, so hash its bytes
                size, digest = _hash_url(client, hf_file_url(src.repo, info.sha, name), hf_headers(), settings)
                files.append(LockedFile(path=name, size=size, sha256=digest))
    if not files:
        raise RemoteError(f"{where}: no files" + (f" match '#{src.glob}'" if src.glob else ""))
    return LockEntry(name=model.name, source=model.source, revision=info.sha, files=files).sealed()


def _hash_url(client: httpx.Client, url: str, headers: dict[str, str], settings: NetSettings) -> tuple[int, str]:
    return hash_with_retries(client, url, settings, headers=headers)


# -- Ollama registry (Docker distribution v2) -----------------------------------------
def registry_base(registry: str) -> tuple[str, str]:
    """(base URL, host as Ollama names it): `http://` marks an insecure registry."""
    host = registry_host(registry)
    if registry.startswith(("http://", "https://")):
        return registry.rstrip("/"), host
    return f"https://{host}", host


def manifest_path(src: OllamaSource) -> str:
    """Where Ollama keeps this model's manifest: manifests/<host>/<namespace>/<name>/<tag>."""
    _, host = registry_base(src.registry)
    return f"manifests/{host}/{src.repository}/{src.tag}"


def registry_token(client: httpx.Client, src: OllamaSource, settings: NetSettings) -> dict[str, str]:
    """Headers for the registry: none, or an anonymous pull token (Docker token auth)."""
    base, _ = registry_base(src.registry)
    # Only a 401 asks for a token; a registry that answers /v2/ otherwise is read as open.
    r = get_with_retries(client, f"{base}/v2/", settings, ok=tuple(range(400, 500)), what=f"registry {src.registry}")
    if r.status_code != 401:
        return {}
    challenge = r.headers.get("www-authenticate", "")
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm", "")
    if not challenge.lower().startswith("bearer ") or not realm:
        raise RemoteError(f"registry {src.registry} wants {challenge or 'credentials'}; only anonymous pull tokens are supported")
    params["scope"] = f"repository:{src.repository}:pull"
    t = get_with_retries(client, str(httpx.URL(realm, params=params)), settings, what=f"token from {realm}")
    try:
        token = t.json().get("token") or t.json()["access_token"]
    except (ValueError, KeyError) as exc:
        raise RemoteError(f"registry {src.registry}: {realm} returned no token ({exc})") from None
    return {"authorization": f"Bearer {token}"}


def resolve_ollama(model: ModelConfig, src: OllamaSource, settings: NetSettings) -> LockEntry:
    """Tag -> manifest digest; pins the manifest itself and every blob it names."""
    base, _ = registry_base(src.registry)
    url = f"{base}/v2/{src.repository}/manifests/{src.tag}"
    with settings.client() as client:
        auth = registry_token(client, src, settings)
        r = get_with_retries(client, url, settings, headers={"accept": f"{MANIFEST_V2}, {OCI_MANIFEST}", **auth},
                             what=f"{model.name}: ollama:{src.name}:{src.tag}")
    raw = r.content
    digest = hashlib.sha256(raw).hexdigest()
    claimed = r.headers.get("docker-content-digest")
    if claimed and claimed != f"sha256:{digest}":
        raise RemoteError(f"{model.name}: {url}: Docker-Content-Digest {claimed} but the manifest hashes to sha256:{digest}")
    try:
        doc = json.loads(raw)
        blobs = [doc["config"], *doc["layers"]]
        media = doc.get("mediaType") or r.headers.get("content-type", MANIFEST_V2).split(";")[0]
        files = [LockedFile(path=manifest_path(src), size=len(raw), sha256=digest, media_type=media)]
        for b in blobs:
            hexd = str(b["digest"]).removeprefix("sha256:")
            files.append(LockedFile(path=f"blobs/sha256-{hexd}", size=int(b["size"]), sha256=hexd,
                                    media_type=str(b["mediaType"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"{model.name}: {url}: not a v2 image manifest ({exc})") from None
    return LockEntry(name=model.name, source=model.source, revision=f"sha256:{digest}", files=files).sealed()


# -- plain URLs ---------------------------------------------------------------------------
def resolve_url(model: ModelConfig, src: UrlSource, settings: NetSettings) -> LockEntry:
    """The URL is the revision; its digest is given, its size asked of the server."""
    with settings.client() as client:
        size = None
        try:
            r = client.head(src.url)
            if r.status_code < 400 and r.headers.get("content-length"):
                size = int(r.headers["content-length"])
        except httpx.TransportError:
            pass
        if size is None:  # no HEAD: fetch and check the digest now
            size, digest = _hash_url(client, src.url, {}, settings)
            if digest != src.sha256:
                raise RemoteError(f"{model.name}: {src.url}: hashes to sha256:{digest}, source pins sha256:{src.sha256}")
    files = [LockedFile(path=src.filename, size=size, sha256=src.sha256)]
    return LockEntry(name=model.name, source=model.source, revision=src.url, files=files).sealed()


# -- entry points ---------------------------------------------------------------------------
def resolve(model: ModelConfig, src: Source, settings: NetSettings | None = None) -> LockEntry:
    """One remote model's lock entry."""
    settings = settings or NetSettings.from_env()
    if isinstance(src, HfSource):
        return resolve_hf(model, src, settings)
    if isinstance(src, OllamaSource):
        return resolve_ollama(model, src, settings)
    if isinstance(src, UrlSource):
        return resolve_url(model, src, settings)
    raise StoreError(f"{model.name}: {model.source} is not a remote source")


def downloads(entry: LockEntry, src: Source, files: list[LockedFile]) -> list[Download]:
    """Where each missing file comes from: always by the pinned, immutable revision."""
    if isinstance(src, HfSource):
        auth = hf_headers()
        return [Download(f, hf_file_url(src.repo, entry.revision, f.path), auth) for f in files]
    if isinstance(src, OllamaSource):
        base, _ = registry_base(src.registry)
        out = []
        for f in files:
            if f.path.startswith("manifests/"):
                accept = {"accept": f.media_type or MANIFEST_V2}
                out.append(Download(f, f"{base}/v2/{src.repository}/manifests/sha256:{f.sha256}", accept))
            else:
                out.append(Download(f, f"{base}/v2/{src.repository}/blobs/sha256:{f.sha256}", {}))
        return out
    if isinstance(src, UrlSource):
        return [Download(f, src.url, {}) for f in files]
    raise StoreError(f"{entry.name}: {entry.source} is not a remote source")


def pull(store: Store, entry: LockEntry, src: Source, progress: PullProgress | None = None,
         settings: NetSettings | None = None) -> None:
    """Download every missing file of one model; raise its first failure after all end."""
    error = pull_many(store, [(entry, src)], progress, settings)[entry.name]
    if error is not None:
        raise error


def pull_many(store: Store, items: list[tuple[LockEntry, Source]], progress: PullProgress | None = None,
              settings: NetSettings | None = None) -> dict[str, BaseException | None]:
    """Download the missing files of every model at once, under one connection limit, largest first.

    A blob two models share is fetched once. Returns each model's first failure (None: all
    its files are in the store); one model failing leaves the others to finish.
    """
    settings = settings or NetSettings.from_env()
    progress = progress or NullProgress()
    jobs: dict[str, Download] = {}  # by sha256: one fetch per blob
    needs: dict[str, list[str]] = {}  # model -> the blobs it waits for
    for entry, src in items:
        missing = store.missing(entry)
        ds = downloads(entry, src, missing)
        if isinstance(src, OllamaSource) and ds:
            # Only the registry needs httpx here (a client costs tens of ms to make: not for every pull).
            with settings.client() as client:
                # httpx drops the token on the registry's cross-origin redirect to its storage.
                auth = registry_token(client, src, settings)
            ds = [replace(d, headers={**d.headers, **auth}) for d in ds]
        for d in ds:
            jobs.setdefault(d.locked.sha256, replace(d, label=f"{entry.name}/{d.locked.path}"))
        needs[entry.name] = [d.locked.sha256 for d in ds]
    store.check_space(sum(d.locked.size - had(store, d.locked) for d in jobs.values()))
    results = _fetch_all(store, sorted(jobs.values(), key=lambda d: had(store, d.locked) - d.locked.size),
                         settings, progress)
    out: dict[str, BaseException | None] = {}
    for entry, _ in items:
        out[entry.name] = next((results[h] for h in needs[entry.name] if results.get(h) is not None), None)
        left = store.missing(entry)
        if out[entry.name] is None and left:  # never reached: every job reports; but never call a model whole that is not
            out[entry.name] = StoreError(f"{entry.name}: {left[0].path} was not fetched; pull again")
        if out[entry.name] is None and is_ollama_entry(entry):
            try:
                check_manifest(entry, store.blob_path(entry.files[0].sha256).read_bytes())
            except StoreError as exc:
                out[entry.name] = exc
    return out


def _fetch_all(store: Store, ds: list[Download], settings: NetSettings,
               progress: PullProgress) -> dict[str, BaseException | None]:
    """Every download on one pool of `settings.parallel` connections; each blob's error, or None."""
    results: dict[str, BaseException | None] = {}
    cancel = threading.Event()
    bulk = settings.bulk_client()
    pool = FetchPool(settings.parallel)
    try:
        for rank, d in enumerate(ds):
            job = FileJob(d.locked, d.url, d.headers, d.label, rank)

            def done(err: BaseException | None, hexd: str = d.locked.sha256) -> None:
                results[hexd] = err

            pool.submit((rank, 0), lambda job=job, done=done: fetch_file(  # type: ignore[misc]
                store, bulk, job, settings, progress, pool.submit, cancel, done))
        pool.wait()
    except BaseException:  # Ctrl-C: every transfer stops at its next chunk, keeping what arrived
        cancel.set()
        pool.wait()
        raise
    finally:
        pool.close()
    return results
