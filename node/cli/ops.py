"""Running and watching the node: up, status, gpus."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.table import Table

from node.admin.client import AdminClient
from node.cli.root import ConfigOption, app, config_from, console


@app.command()
def up(config: Optional[str] = ConfigOption) -> None:
    """Run the node in the foreground (what systemd runs)."""
    cfg = config_from(config)  # a bad config is reported here, as by every other command
    # The server is its own program: this process becomes it (same pid for systemd), so
    # the CLI never loads the server's modules. -P: the working directory never shadows `node`.
    argv = [sys.executable, "-P", "-m", "node.server", str(cfg.path)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def _ago(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _bar(frac: float, width: int = 20) -> str:
    """A memory bar: green under 70 %, yellow under 90 %, red above."""
    frac = min(max(frac, 0.0), 1.0)
    full = round(frac * width)
    colour = "green" if frac < 0.7 else "yellow" if frac < 0.9 else "red"
    return f"[{colour}]{'█' * full}[/][dim]{'░' * (width - full)}[/]"


@app.command()
def status(config: Optional[str] = ConfigOption, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The node at a glance: readiness, traffic of the last minute, replicas and GPUs."""

    data = AdminClient(config_from(config)).get("/admin/v1/status")
    if as_json:
        print(json.dumps(data, indent=2))
        return
    n = data["node"]
    state = "[green]ready[/]" if n["ready"] else "[yellow]not ready[/]"
    console.print(f"[bold]{escape(n['name'])}[/] {state}  listen {n['listen']}  up {_ago(time.time() - n['uptime_s'])}  "
                  f"v{n['version']}  {n['keys']} keys")
    for reason in n["reasons"]:
        console.print(f"  [yellow]•[/] {escape(reason)}", highlight=False)
    tr = data.get("traffic")
    if tr:
        err = tr["error_rate"]
        colour = "green" if err == 0 else "yellow" if err < 0.05 else "red"
        console.print(f"last {tr['window_s']:.0f}s: {tr['requests_per_s']:.2f} req/s, {tr['requests']} requests, "
                      f"[{colour}]{err:.1%} errors[/] ({tr['errors']} 5xx), {tr['rejected']} rejected by quotas",
                      highlight=False)
    led = data.get("ledger")
    if led:
        colour = ("red" if led["dropped"] or not led["database_up"]
                  else "yellow" if led["spill_bytes"] or led.get("quarantined") else "green")
        db = "database up" if led["database_up"] else "database unreachable"
        console.print(f"ledger: [{colour}]{db}[/], {led['queued']} rows queued, {led['written']} written, "
                      f"{led['spilled']} spilled ({led['spill_bytes']} bytes awaiting replay), {led['dropped']} dropped, "
                      f"{led.get('quarantined', 0)} quarantined",
                      highlight=False)
    t = Table(title="replicas", title_justify="left")
    for col in ("model", "replica", "runtime", "state", "since", "restarts", "port", "gpus", "last error"):
        t.add_column(col)
    colours = {"ready": "green", "starting": "cyan", "loading": "cyan", "failed": "red", "unhealthy": "yellow",
               "restarting": "yellow", "unloaded": "dim"}
    for w in data["workers"]:
        st = w["state"] + (" (asleep)" if w.get("sleeping") else "")
        t.add_row(w["model"], str(w["replica"]), w["runtime"], f"[{colours.get(w['state'], 'white')}]{st}[/]", _ago(w["since"]),
                  str(w["restarts"]), str(w["port"] or "-"), ",".join(g[:12] for g in w["gpus"]) or "cpu",
                  escape((w["last_error"] or "").splitlines()[0][:60]) if w["last_error"] else "")
    console.print(t)
    gpus = data["gpus"]
    if gpus["data"]:
        g = Table(title="GPUs", title_justify="left")
        for col in ("#", "name", "memory", "util", "temp", "power"):
            g.add_column(col)
        for x in gpus["data"]:
            frac = x["memory_used"] / x["memory_total"] if x["memory_total"] else 0
            g.add_row(str(x["index"]), x["name"],
                      f"{_bar(frac)} {x['memory_used'] / 2**30:.1f}/{x['memory_total'] / 2**30:.1f} GiB",
                      f"{x['utilization'] * 100:.0f}%" if x.get("utilization") is not None else "-",
                      f"{x['temperature_c']:.0f}°C" if x.get("temperature_c") is not None else "-",
                      f"{x['power_w']:.0f} W" if x.get("power_w") is not None else "-")
        console.print(g)
    else:
        console.print(f"GPUs: {escape(gpus['error'] or 'none')}")


@app.command()
def gpus(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The NVML inventory of this box (no driver or no GPU is a normal state, exit 0)."""
    from node.workers.gpus import discover

    inv = discover()
    if as_json:
        print(json.dumps(inv.as_dict(), indent=2))
        return
    if not inv.gpus:
        console.print(inv.error or "no NVIDIA GPU found", highlight=False)
        return
    t = Table(title=f"driver {inv.driver}", title_justify="left")
    for col in ("#", "uuid", "name", "memory used/total", "free", "util", "temp", "power", "cc", "mig"):
        t.add_column(col)
    for g in inv.gpus:
        t.add_row(str(g.index), g.uuid, g.name, f"{g.memory_used / 2**30:.1f}/{g.memory_total / 2**30:.1f} GiB",
                  f"{g.memory_free / 2**30:.1f} GiB",
                  "-" if g.utilization is None else f"{g.utilization * 100:.0f}%",
                  "-" if g.temperature_c is None else f"{g.temperature_c:.0f}°C",
                  "-" if g.power_w is None else f"{g.power_w:.0f} W",
                  g.compute_capability or "-", "on" if g.mig_mode else "off")
        for d in g.mig_devices:  # MIG instances are placed on like GPUs, so list them
            t.add_row(f"{g.index}/{d.index}", d.uuid, f"  {d.name}",
                      f"{d.memory_used / 2**30:.1f}/{d.memory_total / 2**30:.1f} GiB", f"{d.memory_free / 2**30:.1f} GiB",
                      "-", "-", "-", "", "")
    console.print(t)
    if inv.error:  # some GPU could not be read
        console.print(f"[yellow]{inv.error}[/]", highlight=False)


@app.command()
def load(name: str = typer.Argument(..., help="the on-demand model to load"), config: Optional[str] = ConfigOption) -> None:
    """Load an on-demand model now (evicting idle ones if it must); returns once it is ready."""
    cfg = config_from(config)
    data = AdminClient(cfg, timeout=cfg.node.load_timeout_s + 30).post(f"/admin/v1/models/{quote(name, safe='')}/load")
    console.print(f"{escape(data['model'])} ready (load took {data['seconds']:.2f}s)", highlight=False)


@app.command()
def unload(name: str = typer.Argument(..., help="the on-demand model to unload"), config: Optional[str] = ConfigOption) -> None:
    """Unload (or put to sleep) an on-demand model now."""
    cfg = config_from(config)
    data = AdminClient(cfg, timeout=cfg.supervisor.stop_timeout_s + 90).post(f"/admin/v1/models/{quote(name, safe='')}/unload")
    console.print(f"{escape(data['model'])} unloaded ({data['unloaded']} replica(s) were up)", highlight=False)
