"""`infernode fleet`: membership of a LiteLLM proxy, through the running node's admin API."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer
from rich.markup import escape

from node.admin.client import AdminClient
from node.cli.root import ConfigOption, app, config_from, console
from node.ops.fleet import Deployment, model_list_yaml

fleet_app = typer.Typer(no_args_is_help=True, help="Join a LiteLLM proxy as an upstream (the fleet.litellm section of appliance.toml).")
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("register")
def register(config: Optional[str] = ConfigOption) -> None:
    """Register this node's ready models with the proxy now, and keep them registered."""
    data = AdminClient(config_from(config)).post("/admin/v1/fleet/register")
    ids = data["registered"]
    console.print(f"registered {len(ids)} deployment(s) with {data['proxy']}", highlight=False)
    for i in ids:
        console.print(f"  {i}", highlight=False)


@fleet_app.command("deregister")
def deregister(config: Optional[str] = ConfigOption) -> None:
    """Remove this node's deployments from the proxy and stop re-registering them."""
    data = AdminClient(config_from(config)).post("/admin/v1/fleet/deregister")
    console.print(f"removed {data['removed']} deployment(s)")


@fleet_app.command("status")
def status(config: Optional[str] = ConfigOption, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Whether the node is registered, what, and the last error."""
    data = AdminClient(config_from(config)).get("/admin/v1/fleet")
    if as_json:
        print(json.dumps(data, indent=2))
        return
    if not data["enabled"]:
        console.print(f"fleet: off ({escape(data['reason'])})", highlight=False)
        return
    state = "registering" if data["registering"] else "not registering"
    synced = f"last sync {int(time.time() - data['last_sync'])}s ago" if data["last_sync"] else "never synced"
    console.print(f"fleet: {data['proxy']}  {state}  {synced}  key {data['key_id'] or '-'}", highlight=False)
    console.print(f"ready models: {', '.join(data['ready_models']) or 'none'}", highlight=False)
    for i in data["registered"]:
        console.print(f"  registered {i}", highlight=False)
    if data["last_error"]:
        retry = f" (retry in {data['next_retry_s']:.0f}s)" if data.get("next_retry_s") else ""
        console.print(f"[yellow]last error{retry}:[/] {escape(data['last_error'])}", highlight=False)


@fleet_app.command("config")
def config_cmd(config: Optional[str] = ConfigOption) -> None:
    """Print the `model_list` entries for a LiteLLM config.yaml (proxies without a database)."""
    data = AdminClient(config_from(config)).get("/admin/v1/fleet/config")
    deps = [Deployment(id=d["model_info"]["id"], model_name=d["model_name"], litellm_params=d["litellm_params"],
                       model_info={k: v for k, v in d["model_info"].items() if k != "id"}) for d in data["data"]]
    # Plain stdout: the output is meant to be pasted or redirected, with no colour codes.
    print(model_list_yaml(deps), end="")
