"""The `infernode` command line (typer). Talks to a running node only through its admin API."""

from __future__ import annotations

import sys

from rich.markup import escape

from node.cli import batches, doctor, fleet, keys, models, ops, runtimes, tls, tokens  # noqa: F401  (each module adds its commands to the root)
from node.cli.root import app, err_console
from node.errors import ConfigError, NodeError


def main() -> None:
    """Entry point: typer reports bad usage (exit 2); our errors are one clear line each."""
    try:
        app()  # standalone: typer prints usage errors itself and exits 2, whichever click it bundles
    except ConfigError as exc:
        err_console.print("[red]error:[/] " + escape(exc.message), highlight=False, soft_wrap=True)
        sys.exit(2)
    except NodeError as exc:
        err_console.print("[red]error:[/] " + escape(exc.message), highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
