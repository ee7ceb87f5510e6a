"""The `infernode` command line (typer). Talks to a running node only through its admin API."""

from __future__ import annotations

import sys
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

from node.config import Config, load_config
from node.errors import ConfigError, NodeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Infernode: a self-hosted inference node appliance.")
console = Console()
err_console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="appliance.toml (default: $INFERNODE_CONFIG, ./appliance.toml, /etc/infernode/appliance.toml)")


def config_from(path: Optional[str]) -> Config:
    return load_config(path)


def main() -> None:
    """Entry point: one clear line and the right exit code for every failure."""
    from node.cli import doctor, fleet, keys, models, ops, tls  # noqa: F401  (registers the commands)
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except ConfigError as exc:
        err_console.print("[red]error:[/] " + escape(exc.message), highlight=False, soft_wrap=True)
        sys.exit(2)
    except NodeError as exc:
        err_console.print("[red]error:[/] " + escape(exc.message), highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
