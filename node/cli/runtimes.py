"""`infernode runtimes build`: build a runtime's server from its pinned sources into the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import runtimes as adapters
from node.cli.root import app, console, err_console
from node.errors import OperationFailed
from node.supply.builds import ServerCache, build_key, cache_root, locate, wants_gpu
from node.supply.progress import RichBuildProgress
from node.workers.gpus import discover

runtimes_app = typer.Typer(help="The runtimes' server executables the node builds itself.", no_args_is_help=True)
app.add_typer(runtimes_app, name="runtimes")


def _buildable() -> list[str]:
    return [n for n in adapters.NAMES if (s := adapters.server_binary(n)) is not None and s.build is not None]


@runtimes_app.command("build")
def build(names: Optional[list[str]] = typer.Argument(None, help="runtimes to build (default: every one the node can build)"),
          force: bool = typer.Option(False, "--force", help="build into the cache even when the server is on PATH"),
          sources: Optional[Path] = typer.Option(None, "--sources", help="a local copy of the pinned source archive "
                                                 "(air-gapped boxes); checked against its sha256 like a download")) -> None:
    """Fetch a runtime's pinned sources, verify their sha256, build its server and cache it (once per machine)."""
    buildable = _buildable()
    if sources is not None and len(names or buildable) != 1:
        err_console.print("infernode runtimes build: --sources is the archive of one runtime; name it")
        raise typer.Exit(2)
    for name in names or buildable:
        if name not in buildable:
            err_console.print(f"infernode runtimes build: no runtime {name!r} to build; use one of {', '.join(buildable)}")
            raise typer.Exit(2)
    gpus = bool(discover().gpus)
    cache = ServerCache(cache_root(), gpus=gpus)
    for name in names or buildable:
        server = adapters.server_binary(name)
        assert server is not None and server.build is not None
        found = None if force else locate(server, None, cache)
        if found is not None:
            console.print(f"{name}: {server.name} is {found}; nothing to build")
            continue
        gpu = wants_gpu(server.build, gpus=gpus)
        console.print(f"{name}: building {server.name} ({'CUDA' if gpu else 'CPU'}, key {build_key(server.build, gpu)}) "
                      f"from {server.build.url}, sha256 {server.build.sha256[:12]}...")
        with RichBuildProgress(console) as progress:
            built = cache.ensure(server, progress, sources=sources)
        console.print(f"{name}: {built}")


@runtimes_app.command("path")
def path(name: str = typer.Argument(..., help="the runtime")) -> None:
    """Print the server executable the node would run for a runtime (exit 1 when there is none yet)."""
    server = adapters.server_binary(name) if name in adapters.NAMES else None
    if server is None:
        err_console.print(f"infernode runtimes path: {name!r} has no server executable; use one of {', '.join(_buildable())}")
        raise typer.Exit(2)
    found = locate(server, None, ServerCache(cache_root(), gpus=bool(discover().gpus)))
    if found is None:
        raise OperationFailed(f"{server.name} is neither on PATH nor built yet; run `infernode runtimes build {name}`")
    console.print(str(found), soft_wrap=True)
