"""API keys and usage, through the running node's admin API."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime
from typing import Any, Optional

import typer
from rich.table import Table

from node.admin.client import AdminClient
from node.cli.root import ConfigOption, app, config_from, console
from node.errors import InvalidRequest

keys_app = typer.Typer(no_args_is_help=True, help="Create, list, update and revoke API keys.")
app.add_typer(keys_app, name="keys")
teams_app = typer.Typer(no_args_is_help=True, help="Teams: limits and budgets shared by their keys.")
app.add_typer(teams_app, name="teams")


def _time(value: Optional[str], flag: str) -> Optional[float]:
    """Unix seconds from an ISO date/time or a number."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{flag} {value!r}: give an ISO date (2026-01-31 or 2026-01-31T12:00) or unix seconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _fields(team, model, rpm, tpm, max_parallel, budget, period, user_rpm, user_tpm, expires, meta) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for k, v in (("team", team), ("rpm", rpm), ("tpm", tpm), ("max_parallel", max_parallel), ("budget_tokens", budget),
                 ("budget_period", period), ("user_rpm", user_rpm), ("user_tpm", user_tpm)):
        if v is not None:
            body[k] = v
    if model:
        body["models"] = list(model)
    if expires is not None:
        body["expires_at"] = _time(expires, "--expires")
    if meta:
        md = {}
        for item in meta:
            k, sep, v = item.partition("=")
            if not sep:
                raise InvalidRequest(f"--meta {item!r}: write KEY=VALUE")
            md[k] = v
        body["metadata"] = md
    return body


TeamOpt = typer.Option(None, "--team", help="team the key belongs to")
ModelOpt = typer.Option(None, "--model", "-m", help="allowed model (repeat); default: all")
RpmOpt = typer.Option(None, "--rpm", help="requests per minute")
TpmOpt = typer.Option(None, "--tpm", help="tokens per minute")
ParOpt = typer.Option(None, "--max-parallel", help="requests in flight at once")
BudgetOpt = typer.Option(None, "--budget", help="token budget per period")
PeriodOpt = typer.Option(None, "--period", help="budget period: day or month (UTC)")
URpmOpt = typer.Option(None, "--user-rpm", help="requests per minute per end user (`user` field)")
UTpmOpt = typer.Option(None, "--user-tpm", help="tokens per minute per end user")
ExpOpt = typer.Option(None, "--expires", help="expiry: ISO date/time (UTC) or unix seconds")
MetaOpt = typer.Option(None, "--meta", help="metadata KEY=VALUE (repeat)")


@keys_app.command("create")
def create(name: str = typer.Option(..., "--name", help="a name to recognise the key by"),
           team: Optional[str] = TeamOpt, model: Optional[list[str]] = ModelOpt, rpm: Optional[int] = RpmOpt,
           tpm: Optional[int] = TpmOpt, max_parallel: Optional[int] = ParOpt, budget: Optional[int] = BudgetOpt,
           period: Optional[str] = PeriodOpt, user_rpm: Optional[int] = URpmOpt, user_tpm: Optional[int] = UTpmOpt,
           expires: Optional[str] = ExpOpt, meta: Optional[list[str]] = MetaOpt,
           as_json: bool = typer.Option(False, "--json"), config: Optional[str] = ConfigOption) -> None:
    """Create a key; its secret is printed once and stored only as a hash."""
    body = {"name": name, **_fields(team, model, rpm, tpm, max_parallel, budget, period, user_rpm, user_tpm, expires, meta)}
    data = AdminClient(config_from(config)).post("/admin/v1/keys", json=body)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console.print(f"created key [bold]{data['id']}[/] ({data['name']})", highlight=False)
    console.print("secret (shown once, store it now):", highlight=False)
    print(data["key"])


def _show(rows: list[dict[str, Any]]) -> None:
    t = Table()
    for col in ("id", "name", "prefix", "team", "models", "rpm", "tpm", "parallel", "budget", "expires", "revoked"):
        t.add_column(col)
    for r in rows:
        exp = datetime.fromtimestamp(r["expires_at"], UTC).strftime("%Y-%m-%d %H:%M") if r["expires_at"] else "-"
        budget = f"{r['budget_tokens']}/{r['budget_period']}" if r["budget_tokens"] is not None else "-"
        t.add_row(r["id"], r["name"], r["prefix"] + "…", r["team"] or "-", ",".join(r["models"]) if r["models"] else "all",
                  str(r["rpm"] or "-"), str(r["tpm"] or "-"), str(r["max_parallel"] or "-"), budget, exp,
                  "[red]yes[/]" if r["revoked"] else "no")
    console.print(t)


@keys_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json"), config: Optional[str] = ConfigOption) -> None:
    """List keys (never their secrets)."""
    _, rows = AdminClient(config_from(config)).get_all("/admin/v1/keys")
    print(json.dumps(rows, indent=2)) if as_json else _show(rows)


@keys_app.command("get")
def get(key_id: str, config: Optional[str] = ConfigOption) -> None:
    """Show one key."""
    print(json.dumps(AdminClient(config_from(config)).get(f"/admin/v1/keys/{key_id}"), indent=2))


@keys_app.command("update")
def update(key_id: str, name: Optional[str] = typer.Option(None, "--name"), team: Optional[str] = TeamOpt,
           model: Optional[list[str]] = ModelOpt, rpm: Optional[int] = RpmOpt, tpm: Optional[int] = TpmOpt,
           max_parallel: Optional[int] = ParOpt, budget: Optional[int] = BudgetOpt, period: Optional[str] = PeriodOpt,
           user_rpm: Optional[int] = URpmOpt, user_tpm: Optional[int] = UTpmOpt, expires: Optional[str] = ExpOpt,
           meta: Optional[list[str]] = MetaOpt, all_models: bool = typer.Option(False, "--all-models", help="allow every model"),
           config: Optional[str] = ConfigOption) -> None:
    """Change a key's limits; takes effect within a second."""
    body = _fields(team, model, rpm, tpm, max_parallel, budget, period, user_rpm, user_tpm, expires, meta)
    if name:
        body["name"] = name
    if all_models:
        body["models"] = None
    print(json.dumps(AdminClient(config_from(config)).patch(f"/admin/v1/keys/{key_id}", json=body), indent=2))


@keys_app.command("revoke")
def revoke(key_id: str, config: Optional[str] = ConfigOption) -> None:
    """Revoke a key; requests with it get 401 within a second."""
    data = AdminClient(config_from(config)).post(f"/admin/v1/keys/{key_id}/revoke")
    console.print(f"revoked {data['id']} ({data['name']})", highlight=False)


@keys_app.command("rotate")
def rotate(key_id: str, grace: int = typer.Option(0, "--grace", help="seconds the old secret stays valid"),
           config: Optional[str] = ConfigOption) -> None:
    """Give a key a new secret (printed once); the old one works for --grace seconds more."""
    data = AdminClient(config_from(config)).post(f"/admin/v1/keys/{key_id}/rotate", json={"grace_s": grace})
    console.print(f"rotated {data['id']} ({data['name']}); new secret (shown once):", highlight=False)
    print(data["key"])


def _team_fields(rpm, tpm, max_parallel, budget, period, meta) -> dict[str, Any]:
    body = _fields(None, None, rpm, tpm, max_parallel, budget, period, None, None, None, meta)
    return body


def _show_teams(rows: list[dict[str, Any]]) -> None:
    t = Table()
    for col in ("name", "rpm", "tpm", "parallel", "budget"):
        t.add_column(col)
    for r in rows:
        budget = f"{r['budget_tokens']}/{r['budget_period']}" if r["budget_tokens"] is not None else "-"
        t.add_row(r["name"], str(r["rpm"] if r["rpm"] is not None else "-"),
                  str(r["tpm"] if r["tpm"] is not None else "-"),
                  str(r["max_parallel"] if r["max_parallel"] is not None else "-"), budget)
    console.print(t)


@teams_app.command("create")
def team_create(name: str = typer.Argument(..., help="the team's name; give it to keys with --team"),
                rpm: Optional[int] = RpmOpt, tpm: Optional[int] = TpmOpt, max_parallel: Optional[int] = ParOpt,
                budget: Optional[int] = BudgetOpt, period: Optional[str] = PeriodOpt,
                meta: Optional[list[str]] = MetaOpt, config: Optional[str] = ConfigOption) -> None:
    """Create a team whose limits and budget are shared by all its keys."""
    body = {"name": name, **_team_fields(rpm, tpm, max_parallel, budget, period, meta)}
    print(json.dumps(AdminClient(config_from(config)).post("/admin/v1/teams", json=body), indent=2))


@teams_app.command("list")
def team_list(as_json: bool = typer.Option(False, "--json"), config: Optional[str] = ConfigOption) -> None:
    """List teams and their limits."""
    _, rows = AdminClient(config_from(config)).get_all("/admin/v1/teams")
    print(json.dumps(rows, indent=2)) if as_json else _show_teams(rows)


@teams_app.command("get")
def team_get(name: str, config: Optional[str] = ConfigOption) -> None:
    """Show one team and its keys."""
    print(json.dumps(AdminClient(config_from(config)).get(f"/admin/v1/teams/{name}"), indent=2))


@teams_app.command("update")
def team_update(name: str, rpm: Optional[int] = RpmOpt, tpm: Optional[int] = TpmOpt,
                max_parallel: Optional[int] = ParOpt, budget: Optional[int] = BudgetOpt,
                period: Optional[str] = PeriodOpt, meta: Optional[list[str]] = MetaOpt,
                config: Optional[str] = ConfigOption) -> None:
    """Change a team's limits; takes effect within a second."""
    body = _team_fields(rpm, tpm, max_parallel, budget, period, meta)
    print(json.dumps(AdminClient(config_from(config)).patch(f"/admin/v1/teams/{name}", json=body), indent=2))


@teams_app.command("delete")
def team_delete(name: str, config: Optional[str] = ConfigOption) -> None:
    """Delete a team's limits (its keys keep their own)."""
    AdminClient(config_from(config)).request("DELETE", f"/admin/v1/teams/{name}")
    console.print(f"deleted team {name}", highlight=False)


@app.command()
def usage(key: Optional[str] = typer.Option(None, "--key", help="only this key id"),
          team: Optional[str] = typer.Option(None, "--team", help="only this team"),
          model: Optional[str] = typer.Option(None, "--model", help="only this model"),
          since: Optional[str] = typer.Option(None, "--since", help="ISO date/time (UTC) or unix seconds"),
          until: Optional[str] = typer.Option(None, "--until"),
          group_by: str = typer.Option("key,model", "--group-by", help="any of key,team,model,user,api,day,month"),
          fmt: str = typer.Option("table", "--format", help="table, csv or json"),
          requests: bool = typer.Option(False, "--requests", help="every request, not totals (csv, or JSON lines)"),
          config: Optional[str] = ConfigOption) -> None:
    """Usage grouped by key, team, model, user, day or month (tokens, requests, errors, cost)."""
    if fmt not in ("table", "csv", "json"):
        raise InvalidRequest(f"--format {fmt!r}: use table, csv or json")
    params: dict[str, Any] = {"group_by": group_by}
    for k, v in (("since", _time(since, "--since")), ("until", _time(until, "--until")), ("key", key),
                 ("team", team), ("model", model)):
        if v is not None:
            params[k] = v
    if requests:
        params.pop("group_by")
        params["format"] = "csv" if fmt == "csv" else "jsonl"
        for chunk in AdminClient(config_from(config)).stream("/admin/v1/usage/requests", params=params):
            sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        return
    data, rows = AdminClient(config_from(config)).get_all("/admin/v1/usage", params, page=10_000)
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    cols = data["group_by"] + ["requests", "prompt_tokens", "completion_tokens", "errors", "cost"]
    if fmt == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return
    t = Table()
    for c in cols:
        t.add_column(c, justify="right" if c not in data["group_by"] else "left")
    for r in rows:
        t.add_row(*(f"{r[c]:.4f}" if c == "cost" else str(r[c] if r[c] is not None else "-") for c in cols))
    console.print(t)
