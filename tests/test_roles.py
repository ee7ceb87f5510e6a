"""Roles and admin tokens: every role against every admin route (a table), team-bound tokens,
and the CLI acting with a token; on SQLite and, when configured, PostgreSQL."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from node.accounts.keys import hash_secret
from node.accounts.roles import ACTIONS, Role, allowed
from node.accounts.tokens import TokenRecord, TokenRing
from tests.conftest import run_cli, wait_until
from tests.test_storage import make_db_url

NO_MODELS = ""
A, OP, V = Role.ADMIN, Role.OPERATOR, Role.VIEWER

# The contract, written out independently of node/accounts/roles.py:
# (method, path, body, lowest role, may a team-bound token call it)
ROUTES: list[tuple[str, str, dict | None, Role, bool]] = [
    ("GET", "/admin/v1/status", None, V, True),
    ("GET", "/admin/v1/workers", None, V, True),
    ("GET", "/admin/v1/workers/nope-0/logs", None, V, True),
    ("GET", "/admin/v1/gpus", None, V, True),
    ("GET", "/admin/v1/openapi.json", None, V, True),
    ("GET", "/admin/v1/usage", None, V, True),
    ("GET", "/admin/v1/usage/requests", None, V, True),
    ("GET", "/admin/v1/keys", None, V, True),
    ("GET", "/admin/v1/keys/{red_key}", None, V, True),
    ("GET", "/admin/v1/teams", None, V, True),
    ("GET", "/admin/v1/teams/red", None, V, True),
    ("GET", "/admin/v1/plans", None, V, True),
    ("GET", "/admin/v1/plans/basic", None, V, True),
    ("GET", "/admin/v1/audit", None, V, False),
    ("GET", "/admin/v1/audit/verify", None, V, False),
    ("GET", "/admin/v1/fleet", None, V, False),
    ("POST", "/admin/v1/reload", None, OP, False),
    ("POST", "/admin/v1/models/nope/restart", None, OP, False),
    ("POST", "/admin/v1/models/nope/load", None, OP, False),
    ("POST", "/admin/v1/models/nope/unload", None, OP, False),
    ("POST", "/admin/v1/fleet/register", None, OP, False),
    ("POST", "/admin/v1/fleet/deregister", None, OP, False),
    ("GET", "/admin/v1/fleet/config", None, A, False),   # it carries the fleet key's secret
    ("GET", "/admin/v1/batches", None, V, True),
    ("GET", "/admin/v1/batches/batch_nope", None, V, True),
    ("POST", "/admin/v1/batches/batch_nope/cancel", None, OP, True),
    ("POST", "/admin/v1/keys", {"name": "made", "team": "red"}, A, True),
    ("PATCH", "/admin/v1/keys/{red_key}", {"rpm": 7}, A, True),
    ("POST", "/admin/v1/keys/{red_key}/rotate", {"grace_s": 60}, A, True),
    ("POST", "/admin/v1/keys/{red_key}/revoke", None, A, True),
    ("DELETE", "/admin/v1/keys/{red_key}", None, A, True),
    ("POST", "/admin/v1/teams", {"name": "made"}, A, False),
    ("PATCH", "/admin/v1/teams/red", {"rpm": 9}, A, False),
    ("DELETE", "/admin/v1/teams/gone", None, A, False),
    ("POST", "/admin/v1/plans", {"name": "made"}, A, False),
    ("PATCH", "/admin/v1/plans/basic", {"rpm": 5}, A, False),
    ("DELETE", "/admin/v1/plans/gone", None, A, False),
    ("GET", "/admin/v1/tokens", None, A, False),
    ("POST", "/admin/v1/tokens", {"name": "made", "role": "viewer"}, A, False),
    ("GET", "/admin/v1/tokens/{victim}", None, A, False),
    ("POST", "/admin/v1/tokens/{victim}/revoke", None, A, False),
    ("DELETE", "/admin/v1/tokens/{victim}", None, A, False),
]


def test_allowed_is_ordered_and_refuses_unknown_actions() -> None:
    for action, rule in ACTIONS.items():
        assert allowed(A, action) and allowed(rule.role, action)
        assert allowed(rule.role, action, team_bound=True) == rule.team_scoped
        below = [r for r in Role if r < rule.role]
        assert not any(allowed(r, action) for r in below)
    assert not allowed(A, "keys.delete_everything")


def test_every_admin_route_checks_a_role() -> None:
    """Each route of the admin app names one action of the table, and the table test covers it."""
    from node.admin.routes import build_admin
    from node.app import Node
    from node.config import Config
    app = build_admin(Node(Config()))
    seen = set()
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        actions = [d.call.action for d in route.dependant.dependencies if hasattr(d.call, "action")]
        assert len(actions) == 1 and actions[0] in ACTIONS, f"{route.path} checks no role"
        for method in route.methods:
            seen.add((method, route.path))
    covered = {(m, p.replace("{red_key}", "{key_id}").replace("{victim}", "{token_id}").replace("/red", "/{name}")
                .replace("/basic", "/{name}").replace("/gone", "/{name}").replace("/nope/", "/{name}/")
                .replace("/nope-0/", "/{replica_id}/").replace("/batch_nope", "/{batch_id}"))
               for m, p, *_ in ROUTES}
    assert seen == covered


def test_token_ring_constant_time_and_revocation() -> None:
    secret = "sk-tok-" + secrets.token_urlsafe(8)
    rec = TokenRecord(id="tok_1", name="v", role="viewer", secret_hash=hash_secret(secret), prefix=secret[:11])
    ring = TokenRing([rec])
    ring.set_bootstrap("sk-admin-x")
    assert ring.principal(secret).role is Role.VIEWER
    assert ring.principal("sk-admin-x").role is Role.ADMIN and ring.principal("sk-admin-x").id == "bootstrap"
    assert ring.principal("") is None and ring.principal(secret + "x") is None
    ring.put(rec.updated(revoked=True))
    assert ring.principal(secret) is None


@pytest.fixture(params=["sqlite", "postgresql"])
def db_extra(request, tmp_path: Path) -> Iterator[str]:
    """The [database] section for a node on each backend (PostgreSQL in its own schema)."""
    for url in make_db_url(request.param, tmp_path):
        yield f'[database]\nurl = "{url}"\n' if request.param == "postgresql" else ""


def healthy(n) -> bool:
    try:
        return httpx.get(n.url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def make_token(n, role: str, team: str | None = None) -> str:
    with n.admin() as c:
        body = {"name": f"{role}-{team}", "role": role, **({"team": team} if team else {})}
        r = c.post("/admin/v1/tokens", json=body)
        assert r.status_code == 201, r.text
        data = r.json()
        assert data["token"].startswith("sk-tok-") and "secret_hash" not in data
        return data["token"]


def test_every_role_against_every_admin_route(node_factory, db_extra: str) -> None:
    n = node_factory(NO_MODELS, extra=db_extra + '[plans.basic]\nrpm = 10\n', ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)
    with n.admin() as c:
        assert c.post("/admin/v1/teams", json={"name": "red"}).status_code == 201
        red_key = c.post("/admin/v1/keys", json={"name": "r", "team": "red"}).json()["id"]
        victim = c.post("/admin/v1/tokens", json={"name": "victim", "role": "viewer"}).json()["id"]
    callers = {
        "admin": (A, None, make_token(n, "admin")),
        "operator": (OP, None, make_token(n, "operator")),
        "viewer": (V, None, make_token(n, "viewer")),
        "team admin": (A, "red", make_token(n, "admin", "red")),
        "team viewer": (V, "red", make_token(n, "viewer", "red")),
        "bootstrap": (A, None, n.admin_key),
    }
    failures = []
    for who, (role, team, secret) in callers.items():
        for method, path, body, lowest, team_ok in ROUTES:
            url = n.url + path.format(red_key=red_key, victim=victim)
            r = httpx.request(method, url, json=body, headers={"authorization": f"Bearer {secret}"}, timeout=30)
            expect = role >= lowest and (team is None or team_ok)
            if expect and r.status_code in (401, 403) or not expect and r.status_code != 403:
                failures.append(f"{who} {method} {path}: {r.status_code} {r.text[:120]}")
            if not expect and r.status_code == 403:
                assert r.json()["error"]["code"] == "permission_denied"
    assert not failures, "\n".join(failures)
    # No token, a wrong one, or an API key: 401, before any body is read.
    api_key = n.create_key(name="user")
    for bad in ("", "sk-nope", api_key):
        auth = {"authorization": f"Bearer {bad}"} if bad else {}
        r = httpx.post(n.url + "/admin/v1/keys", content=b"{not json", headers=auth)
        assert r.status_code == 401, (bad, r.text)


def test_team_token_sees_and_touches_only_its_team(node_factory, db_extra: str) -> None:
    n = node_factory(NO_MODELS, extra=db_extra, ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)
    with n.admin() as c:
        for t in ("red", "blue"):
            assert c.post("/admin/v1/teams", json={"name": t}).status_code == 201
        blue = c.post("/admin/v1/keys", json={"name": "b", "team": "blue"}).json()
        loose = c.post("/admin/v1/keys", json={"name": "no team"}).json()
    red_admin = make_token(n, "admin", "red")
    h = {"authorization": f"Bearer {red_admin}"}
    with httpx.Client(base_url=n.url, headers=h, timeout=30) as c:
        made = c.post("/admin/v1/keys", json={"name": "mine"})
        assert made.status_code == 201 and made.json()["team"] == "red"     # put in its team by default
        assert c.post("/admin/v1/keys", json={"name": "x", "team": "blue"}).status_code == 403
        assert [k["id"] for k in c.get("/admin/v1/keys").json()["data"]] == [made.json()["id"]]
        for kid in (blue["id"], loose["id"]):
            assert c.get(f"/admin/v1/keys/{kid}").status_code == 404
            assert c.patch(f"/admin/v1/keys/{kid}", json={"rpm": 1}).status_code == 404
            assert c.post(f"/admin/v1/keys/{kid}/revoke").status_code == 404
            assert c.post(f"/admin/v1/keys/{kid}/rotate").status_code == 404
        # It cannot move its own key to another team either.
        assert c.patch(f"/admin/v1/keys/{made.json()['id']}", json={"team": "blue"}).status_code == 403
        assert [t["name"] for t in c.get("/admin/v1/teams").json()["data"]] == ["red"]
        assert c.get("/admin/v1/teams/blue").status_code == 404
        assert c.get("/admin/v1/usage", params={"team": "blue"}).status_code == 403
        assert c.get("/admin/v1/usage").status_code == 200
    with n.admin() as c:
        assert c.get(f"/admin/v1/keys/{blue['id']}").json()["revoked"] is False
        assert c.get(f"/admin/v1/keys/{loose['id']}").json()["rpm"] != 1


def test_cli_with_tokens(node_factory) -> None:
    n = node_factory(NO_MODELS, ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)
    out = run_cli("tokens", "create", "--role", "viewer", "--json", config=n.config, check=True).stdout
    viewer = json.loads(out)
    listed = run_cli("tokens", "list", "--json", config=n.config, check=True).stdout
    assert viewer["id"] in listed and viewer["token"] not in listed
    as_viewer = {"INFERNODE_ADMIN_KEY": viewer["token"]}
    assert run_cli("keys", "list", config=n.config, env=as_viewer).returncode == 0
    p = run_cli("keys", "create", "--name", "x", config=n.config, env=as_viewer)
    assert p.returncode == 1 and "403" in p.stderr and "keys.manage" in p.stderr
    p = run_cli("tokens", "create", "--role", "root", config=n.config)
    assert p.returncode == 1 and "--role" in p.stderr
    run_cli("tokens", "revoke", viewer["id"], config=n.config, check=True)
    p = run_cli("keys", "list", config=n.config, env=as_viewer)
    assert p.returncode == 1 and "401" in p.stderr
    # Bad input: unknown role, a name far too long, a team that is not a name.
    with n.admin() as c:
        for body in ({"name": "x", "role": "root"}, {"name": "x" * 500, "role": "viewer"},
                     {"name": "x", "role": "viewer", "team": "a b"}, {"role": "viewer"}, [1, 2]):
            r = c.post("/admin/v1/tokens", json=body)
            assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error", body
