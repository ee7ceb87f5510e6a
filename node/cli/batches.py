"""`infernode batches list|show|cancel`: batch jobs as the admin API reports them."""

from __future__ import annotations

import json
import time
from typing import Optional
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.table import Table

from node.admin.client import AdminClient
from node.cli.root import ConfigOption, app, config_from, console

batches_app = typer.Typer(help="Batch jobs (OpenAI's Batches API): list, show, cancel.", no_args_is_help=True)
app.add_typer(batches_app, name="batches")


def _progress(b: dict) -> str:
    c = b["request_counts"]
    done = c["completed"] + c["failed"]
    pct = 100 * done / c["total"] if c["total"] else 0
    return f"{done}/{c['total']} ({pct:.0f}%)" + (f", {c['failed']} failed" if c["failed"] else "")


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@batches_app.command("list")
def list_batches(config: Optional[str] = ConfigOption,
                 limit: int = typer.Option(20, min=1, max=1000, help="newest first, at most this many"),
                 as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Batches, newest first, with their progress."""
    data = AdminClient(config_from(config)).get("/admin/v1/batches", params={"limit": limit})["data"]
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table()
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for name in ("progress", "endpoint", "key", "team", "created"):
        table.add_column(name)
    for b in data:
        table.add_row(b["id"], b["status"], _progress(b), b["endpoint"], escape(b.get("key_id") or "-"),
                      escape(b.get("team") or "-"), _when(b["created_at"]))
    console.print(table)


@batches_app.command("show")
def show(batch_id: str, config: Optional[str] = ConfigOption,
         as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """One batch: status, progress, times, output files and errors."""
    b = AdminClient(config_from(config)).get(f"/admin/v1/batches/{quote(batch_id, safe='')}")
    if as_json:
        print(json.dumps(b, indent=2))
        return
    console.print(f"[bold]{b['id']}[/] {b['status']}  {_progress(b)}  {b['endpoint']}")
    for name in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                 "cancelling_at", "cancelled_at", "expires_at"):
        if b.get(name):
            console.print(f"  {name.removesuffix('_at'):<12} {_when(b[name])}")
    console.print(f"  input {b['input_file_id']}  output {b['output_file_id'] or '-'}  errors {b['error_file_id'] or '-'}")
    for e in (b.get("errors") or {}).get("data", [])[:20]:
        console.print(f"  [red]line {e.get('line')}[/] {escape(e['code'])}: {escape(e['message'])}", highlight=False)


@batches_app.command("cancel")
def cancel(batch_id: str, config: Optional[str] = ConfigOption) -> None:
    """Cancel a batch: lines in flight are abandoned, the rest are not run."""
    b = AdminClient(config_from(config)).post(f"/admin/v1/batches/{quote(batch_id, safe='')}/cancel")
    console.print(f"{b['id']} {b['status']}  {_progress(b)}")
