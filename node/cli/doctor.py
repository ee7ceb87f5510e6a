"""`infernode doctor`: one line per check, ok/warn/fail, and what to fix."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.markup import escape

from node.cli.root import ConfigOption, app, config_from, console

MARKS = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[red]fail[/]"}


@app.command()
def doctor(config: Optional[str] = ConfigOption, as_json: bool = typer.Option(False, "--json", help="print JSON"),
           rehash: bool = typer.Option(False, "--rehash", help="also re-hash every model file in the store (slow)")) -> None:
    """Check driver, NVML, runtimes, port, disk, store, database, admin key and fleet; exit 1 on any fail."""
    from node.ops.doctor import Level, run_checks  # the checks load the supervisor: not for every CLI call

    checks = run_checks(config_from(config), rehash=rehash)
    if as_json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            line = f"{MARKS[c.level.value]} {escape(c.name):<{width}}  {escape(c.detail)}"
            if c.fix and c.level is not Level.OK:
                line += f"  [dim]→ {escape(c.fix)}[/]"
            console.print(line, highlight=False, soft_wrap=True, markup=True)
    failed = sum(c.level is Level.FAIL for c in checks)
    warned = sum(c.level is Level.WARN for c in checks)
    if not as_json:
        console.print(f"{len(checks)} checks: {failed} failed, {warned} warnings", highlight=False)
    if failed:
        raise typer.Exit(1)
