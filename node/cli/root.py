"""The root `infernode` command and what every subcommand shares: consoles and --config."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from node.config import Config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Infernode: a self-hosted inference node appliance.")
console = Console()
err_console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="appliance.toml (default: $INFERNODE_CONFIG, ./appliance.toml, /etc/infernode/appliance.toml)")


def config_from(path: Optional[str]) -> Config:
    return load_config(path)
