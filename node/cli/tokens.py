"""Admin tokens (roles) and the audit log, through the running node's admin API."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Optional

import typer
from rich.table import Table

from node.admin.client import AdminClient
from node.cli.keys import _time
from node.cli.root import ConfigOption, app, config_from, console
from node.errors import InvalidRequest, OperationFailed

tokens_app = typer.Typer(no_args_is_help=True, help="Admin tokens with a role (admin, operator, viewer).")
app.add_typer(tokens_app, name="tokens")


@tokens_app.command("create")
def create(role: str = typer.Option(..., "--role", help="admin, operator or viewer"),
           name: Optional[str] = typer.Option(None, "--name", help="a name to recognise the token by"),
           team: Optional[str] = typer.Option(None, "--team", help="bind the token to one team"),
           as_json: bool = typer.Option(False, "--json"), config: Optional[str] = ConfigOption) -> None:
    """Create an admin token; its secret is printed once and stored only as a hash."""
    if role not in ("admin", "operator", "viewer"):
        raise InvalidRequest(f"--role {role!r}: use admin, operator or viewer")
    body: dict[str, Any] = {"name": name or f"{role}{'-' + team if team else ''}", "role": role}
    if team:
        body["team"] = team
    data = AdminClient(config_from(config)).post("/admin/v1/tokens", json=body)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console.print(f"created {data['role']} token [bold]{data['id']}[/] ({data['name']})", highlight=False)
    console.print("secret (shown once, store it now; use it as the admin key):", highlight=False)
    print(data["token"])


@tokens_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json"), config: Optional[str] = ConfigOption) -> None:
    """List admin tokens (never their secrets)."""
    _, rows = AdminClient(config_from(config)).get_all("/admin/v1/tokens")
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table()
    for col in ("id", "name", "role", "team", "prefix", "created by", "revoked"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"], r["name"], r["role"], r["team"] or "-", r["prefix"] + "…", r["created_by"] or "-",
                  "[red]yes[/]" if r["revoked"] else "no")
    console.print(t)


@tokens_app.command("revoke")
def revoke(token_id: str, config: Optional[str] = ConfigOption) -> None:
    """Revoke an admin token; it is refused at once."""
    data = AdminClient(config_from(config)).post(f"/admin/v1/tokens/{token_id}/revoke")
    console.print(f"revoked {data['id']} ({data['name']})", highlight=False)


@app.command()
def audit(verify: bool = typer.Option(False, "--verify", help="check the hash chain; exit 1 if broken"),
          since: Optional[str] = typer.Option(None, "--since", help="ISO date/time (UTC) or unix seconds"),
          until: Optional[str] = typer.Option(None, "--until"),
          actor: Optional[str] = typer.Option(None, "--actor", help="token id (bootstrap: the admin key)"),
          action: Optional[str] = typer.Option(None, "--action", help="e.g. keys.create, or keys. for all keys.*"),
          as_json: bool = typer.Option(False, "--json"), config: Optional[str] = ConfigOption) -> None:
    """The audit log of admin writes; --verify checks that no record was edited or deleted."""
    client = AdminClient(config_from(config))
    if verify:
        v = client.get("/admin/v1/audit/verify")
        if as_json:
            print(json.dumps(v, indent=2))
        if not v["ok"]:
            raise OperationFailed(f"audit chain broken: {v['problem']}")
        if not as_json:
            console.print(f"audit chain ok: {v['records']} records, head {v['head']}", highlight=False)
        return
    params: dict[str, Any] = {}
    for k, val in (("since", _time(since, "--since")), ("until", _time(until, "--until")), ("actor", actor),
                   ("action", action)):
        if val is not None:
            params[k] = val
    # The newest 1000 matching records, shown oldest first (narrow with --since/--until/--actor/--action).
    rows = client.get("/admin/v1/audit", params={**params, "newest_first": "true", "limit": 1000})["data"][::-1]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table()
    for col in ("seq", "time (UTC)", "actor", "role", "source", "action", "target", "changes"):
        t.add_column(col)
    for r in rows:
        when = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        t.add_row(str(r["seq"]), when, r["actor_id"], r["actor_role"], r["source"], r["action"], r["target"],
                  json.dumps(r["changes"])[:80])
    console.print(t)
