"""The model supply chain: init, lock, pull, verify, bundle export.

Each command imports the supply modules it runs inside its body, so `infernode --help` and
the other commands load none of them.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Optional

import typer

from node.cli.root import ConfigOption, app, config_from, console, err_console
from node.errors import OperationFailed, StoreError
from node.supply.lockfile import LockFile, read_lock, write_lock
from node.supply.store import Problem, Store

STARTER = """\
# Infernode appliance configuration. Every key: docs/reference/appliance-toml.md.
[node]
name = "{name}"
listen = "0.0.0.0:8080"
data_dir = "{data_dir}"
admin_key_env = "INFERNODE_ADMIN_KEY"

[[models]]
name = "tiny-chat"                      # the `model` clients send
source = "builtin:tiny-chat#*.gguf"     # a tiny random-weight Llama shipped with infernode
runtime = "llamacpp"
gpus = 0

[quotas.default]
rpm = 600
tpm = 1000000
"""


@app.command()
def init(dir: Path = typer.Option(Path("."), "--dir", help="where to write appliance.toml and models.lock"),
         data_dir: str = typer.Option("/var/lib/infernode", "--data-dir")) -> None:
    """Write a starter appliance.toml (GPUs detected) and an empty models.lock."""
    from node.workers.gpus import discover

    dir.mkdir(parents=True, exist_ok=True)
    cfg = dir / "appliance.toml"
    if cfg.exists():
        raise OperationFailed(f"{cfg} exists; edit it, or remove it to start over")
    inv = discover()
    text = STARTER.format(name=socket.gethostname(), data_dir=data_dir)
    if inv.gpus:
        text += "\n# GPUs found: " + ", ".join(f"{g.index}: {g.name} ({g.memory_total / 2**30:.0f} GiB)" for g in inv.gpus) + "\n"
    else:
        text += f"\n# No GPU found ({inv.error}); CPU models only.\n"
    cfg.write_text(text)
    lock = dir / "models.lock"
    if not lock.exists():
        write_lock(lock, LockFile())
    console.print(f"wrote {cfg} and {lock}; next: `infernode lock && infernode pull`", highlight=False, soft_wrap=True)


@app.command()
def lock(check: bool = typer.Option(False, "--check", help="exit 1 if models.lock is stale; write nothing"),
         config: Optional[str] = ConfigOption) -> None:
    """Resolve every model source to an immutable revision and per-file sha256; write models.lock."""
    from node.supply.resolve import build_lock, stale_models

    cfg = config_from(config)
    current = read_lock(cfg.lock_path)
    if check:
        stale = stale_models(cfg, current)
        extra = [e.name for e in current.models if cfg.model(e.name) is None]
        for name, why in stale.items():
            err_console.print(f"{cfg.lock_path}: {name}: {why}", highlight=False, soft_wrap=True)
        for name in extra:
            err_console.print(f"{cfg.lock_path}: {name}: locked but not in {cfg.path}; run `infernode lock`", highlight=False, soft_wrap=True)
        if stale or extra:
            raise typer.Exit(1)
        console.print(f"{cfg.lock_path} is up to date", highlight=False, soft_wrap=True)
        return
    new = build_lock(cfg)
    write_lock(cfg.lock_path, new)
    for e in new.models:
        old = current.entry(e.name)
        change = "unchanged" if old and old.digest == e.sealed().digest else ("updated" if old else "added")
        console.print(f"{e.name}: {e.revision[:19]} {len(e.files)} files, {e.total_size / 1e6:.1f} MB ({change})", highlight=False, soft_wrap=True)
    console.print(f"wrote {cfg.lock_path}", highlight=False, soft_wrap=True)


@app.command()
def pull(names: Optional[list[str]] = typer.Argument(None, help="models to pull (default: all)"),
         from_: Optional[Path] = typer.Option(None, "--from", help="import from a folder or bundle (air-gapped)"),
         json_: bool = typer.Option(False, "--json", help="progress as JSON lines on stdout"),
         config: Optional[str] = ConfigOption) -> None:
    """Download what models.lock pins into the store and verify every digest."""
    from node.supply.progress import JsonProgress, RichProgress
    from node.supply.pull import pull_entries
    from node.supply.resolve import stale_models

    cfg = config_from(config)
    lk = read_lock(cfg.lock_path)
    store = Store(cfg.data_dir / "store")
    wanted = names or [m.name for m in cfg.models if m.launched]
    stale = stale_models(cfg, lk)
    if from_ is not None and not from_.exists():
        raise OperationFailed(f"--from {from_}: no such bundle or folder")
    jobs = []
    for name in wanted:
        model = cfg.model(name)
        if model is None:
            raise OperationFailed(f"{cfg.path}: no model named '{name}'")
        if not model.launched:
            raise OperationFailed(f"{cfg.path}: model '{name}' is served by {model.runtime} at its url; there is nothing to pull")
        jobs.append((model, lk.entry(name)))
    failed = 0
    total = sum(sum(f.size for f in store.missing(e)) for m, e in jobs if e is not None and m.name not in stale)
    reporter = JsonProgress() if json_ else RichProgress(err_console, total)
    say = (lambda msg, ok=True: None) if json_ else (lambda msg, ok=True: (console if ok else err_console).print(msg, highlight=False, soft_wrap=True))

    def fail(name: str, why: str) -> None:
        say(f"{name}: {why}", False)
        if json_:
            reporter.event(event="error", model=name, error=why)  # type: ignore[union-attr]

    ready = []
    for model, entry in jobs:
        if model.name in stale or entry is None:
            fail(model.name, stale.get(model.name, "not in models.lock; run `infernode lock`"))
            failed += 1
        else:
            ready.append((entry, model))
    with contextlib.ExitStack() as stack:
        if isinstance(reporter, RichProgress):
            stack.enter_context(reporter)
        results = pull_entries(store, ready, cfg, progress=reporter, from_=from_)  # every model at once
    for (entry, model), res in zip(ready, results):
        if isinstance(res, BaseException):
            fail(model.name, getattr(res, "message", None) or str(res))
            failed += 1
            continue
        say(f"{model.name}: {res.fetched} fetched, {res.present} already present, verified")
        if json_:
            reporter.event(event="model", model=model.name, fetched=res.fetched,  # type: ignore[union-attr]
                           present=res.present, revision=entry.revision)
    if failed:
        raise typer.Exit(1)


@app.command()
def verify(config: Optional[str] = ConfigOption) -> None:
    """Re-hash the store against models.lock; exit 1 naming every bad file (moved aside for `pull`)."""
    from node.supply.manifest import check_manifest, is_ollama_entry

    cfg = config_from(config)
    lk = read_lock(cfg.lock_path)
    store = Store(cfg.data_dir / "store")
    bad = 0
    for entry in lk.models:
        problems = []
        for f in entry.files:
            p = store.rehash(f)
            if p is None:
                continue
            if store.blob_path(f.sha256).exists():
                # A blob with the right size but wrong bytes would look present to `pull`
                # for ever: move it aside so the next pull fetches it again.
                store.quarantine(f)
                p = Problem(p.path, f"{p.what}; moved to {store.root / 'quarantine'}, run `infernode pull`")
            problems.append(str(p))
        if not problems and is_ollama_entry(entry):
            try:
                check_manifest(entry, store.blob_path(entry.files[0].sha256).read_bytes())
            except StoreError as exc:
                problems.append(exc.message)
        for msg in problems:
            err_console.print(f"{entry.name}: {msg}", highlight=False, soft_wrap=True)
        bad += len(problems)
        if not problems:
            console.print(f"{entry.name}: {len(entry.files)} files ok", highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)


bundle_app = typer.Typer(help="Air-gapped bundles: models.lock and its blobs in one archive.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("export")
def bundle_export(out: Path = typer.Argument(..., help="the archive to write (an uncompressed tar)"),
                  config: Optional[str] = ConfigOption) -> None:
    """Write one archive with models.lock and every blob it pins; import with `pull --from OUT`."""
    from node.supply.bundle import export_bundle

    cfg = config_from(config)
    lk = read_lock(cfg.lock_path)
    if not lk.models:
        raise OperationFailed(f"{cfg.lock_path}: pins no models; run `infernode lock` first")
    summary = export_bundle(Store(cfg.data_dir / "store"), lk, out)
    console.print(f"wrote {summary.path}: {summary.models} models, {summary.blobs} blobs, "
                  f"{summary.bytes / 1e6:.1f} MB; import with `infernode pull --from {summary.path}`", highlight=False, soft_wrap=True)
