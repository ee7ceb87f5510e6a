"""The admin API under /admin/v1 (FastAPI), guarded by the admin key."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from node import __version__
from node.accounts.storage import StorageConflict, StorageUnavailable
from node.accounts.teams import TeamRecord
from node.admin.protocol import MAX_TIME, KeyCreate, KeyUpdate, TeamCreate, TeamUpdate, check_text
from node.errors import AuthenticationError, InvalidRequest, NodeError, NoReadyReplica, NotFound, UpstreamError
from node.ops.fleet import ProxyError, desired_deployments
from node.workers.replica import tail_lines

if TYPE_CHECKING:  # the running Node is handed in; only node/app.py and node/server.py import the wiring
    from node.app import Node


def _opt_text(v: str | None) -> str | None:
    return None if v is None else check_text(v)


def build_admin(node: Node) -> FastAPI:
    app = FastAPI(title="infernode admin", openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(NodeError)
    async def _node_error(_: Request, err: NodeError) -> JSONResponse:
        return JSONResponse(status_code=err.status, content=json.loads(err.body()), headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        e = exc.errors()[0]
        param = ".".join(str(p) for p in e["loc"] if p != "body")
        err = InvalidRequest(f"{param}: {e['msg']}", param=param)
        return JSONResponse(status_code=422, content=json.loads(err.body()))

    @app.exception_handler(StorageUnavailable)
    async def _db_down(_: Request, exc: StorageUnavailable) -> JSONResponse:
        err = NodeError(f"database unavailable: {exc}", code="database_unavailable")
        return JSONResponse(status_code=503, content=json.loads(err.body()), headers={"retry-after": "5"})

    @app.exception_handler(StorageConflict)
    async def _conflict(_: Request, exc: StorageConflict) -> JSONResponse:
        err = InvalidRequest(f"already exists: {exc}", code="conflict")
        return JSONResponse(status_code=409, content=json.loads(err.body()))

    def admin(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not node.admin_key or not hmac.compare_digest(presented.encode(), node.admin_key.encode()):
            raise AuthenticationError("admin key required: send Authorization: Bearer <admin key>")

    guard = [Depends(admin)]

    @app.get("/admin/v1/openapi.json", dependencies=guard, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()  # the API's own description is for admins only

    def key_or_404(key_id: str):
        record = node.keys.get(key_id)
        if record is None:
            raise NotFound(f"no key with id '{key_id}'", code="key_not_found")
        return record

    @app.post("/admin/v1/keys", dependencies=guard, status_code=201)
    async def create_key(body: KeyCreate) -> dict[str, Any]:
        fields = body.model_dump(exclude_none=True)
        if "models" in fields:
            fields["models"] = tuple(fields["models"])
        record, secret = await node.create_key(**fields)
        return {**record.public(), "key": secret}

    @app.get("/admin/v1/keys", dependencies=guard)
    async def list_keys(q: str | None = Query(None, max_length=200), limit: int | None = Query(None, ge=1, le=100_000),
                        offset: int = Query(0, ge=0, le=10_000_000), newest_first: bool = False) -> dict[str, Any]:
        """Keys oldest first (or newest first); `q` matches name, id, team or prefix; `total` counts all matches."""
        records = sorted(node.keys.all(), key=lambda r: r.created_at, reverse=newest_first)
        if q:
            needle = q.lower()
            records = [r for r in records
                       if needle in r.name.lower() or needle in r.id or needle in (r.team or "").lower() or needle in r.prefix]
        page = records[offset:offset + limit] if limit is not None else records[offset:]
        return {"object": "list", "total": len(records), "data": [r.public() for r in page]}

    @app.get("/admin/v1/keys/{key_id}", dependencies=guard)
    async def get_key(key_id: str) -> dict[str, Any]:
        return key_or_404(key_id).public()

    @app.patch("/admin/v1/keys/{key_id}", dependencies=guard)
    async def update_key(key_id: str, body: KeyUpdate) -> dict[str, Any]:
        record = key_or_404(key_id)
        changes = body.model_dump(exclude_unset=True)
        if "models" in changes and changes["models"] is not None:
            changes["models"] = tuple(changes["models"])
        for name in ("metadata", "budget_period", "name", "revoked"):  # null for a field that cannot be: unchanged
            if name in changes and changes[name] is None:
                changes.pop(name)
        record = record.updated(**changes)
        await node.save_key(record)
        return record.public()

    @app.post("/admin/v1/keys/{key_id}/revoke", dependencies=guard)
    @app.delete("/admin/v1/keys/{key_id}", dependencies=guard)
    async def revoke_key(key_id: str) -> dict[str, Any]:
        record = key_or_404(key_id).updated(revoked=True)
        await node.save_key(record)
        return record.public()

    def team_or_404(name: str) -> TeamRecord:
        team = node.quotas.team(name)
        if team is None:
            raise NotFound(f"no team named '{name}'", code="team_not_found")
        return team

    @app.post("/admin/v1/teams", dependencies=guard, status_code=201)
    async def create_team(body: TeamCreate) -> dict[str, Any]:
        assert node.storage is not None
        team = TeamRecord(**body.model_dump(exclude_none=True))
        await asyncio.to_thread(node.storage.insert_team, team)
        await node.refresh_keys(force=True)
        return team.public()

    @app.get("/admin/v1/teams", dependencies=guard)
    async def list_teams() -> dict[str, Any]:
        assert node.storage is not None
        teams = await asyncio.to_thread(node.storage.list_teams)
        return {"object": "list", "data": [t.public() for t in teams]}

    @app.get("/admin/v1/teams/{name}", dependencies=guard)
    async def get_team(name: str) -> dict[str, Any]:
        team = team_or_404(name)
        keys = sorted(k.id for k in node.keys.all() if k.team == name)
        return {**team.public(), "keys": keys}

    @app.patch("/admin/v1/teams/{name}", dependencies=guard)
    async def update_team(name: str, body: TeamUpdate) -> dict[str, Any]:
        assert node.storage is not None
        changes = body.model_dump(exclude_unset=True)
        if changes.get("metadata") is None:
            changes.pop("metadata", None)
        if changes.get("budget_period") is None:
            changes.pop("budget_period", None)
        team = team_or_404(name).updated(**changes)
        await asyncio.to_thread(node.storage.save_team, team)
        await node.refresh_keys(force=True)
        return team.public()

    @app.delete("/admin/v1/teams/{name}", dependencies=guard)
    async def delete_team(name: str) -> dict[str, Any]:
        """Remove a team's limits; its keys keep the team name (for usage) and their own limits."""
        assert node.storage is not None
        team_or_404(name)
        await asyncio.to_thread(node.storage.delete_team, name)
        await node.refresh_keys(force=True)
        return {"name": name, "deleted": True}

    @app.get("/admin/v1/usage", dependencies=guard)
    async def usage(group_by: Annotated[str, Query(max_length=200)] = "key,model",
                    since: Annotated[float | None, Query(ge=0, le=MAX_TIME, allow_inf_nan=False)] = None,
                    until: Annotated[float | None, Query(ge=0, le=MAX_TIME, allow_inf_nan=False)] = None,
                    key: Annotated[str | None, Query(max_length=200), AfterValidator(_opt_text)] = None,
                    team: Annotated[str | None, Query(max_length=200), AfterValidator(_opt_text)] = None,
                    model: Annotated[str | None, Query(max_length=200), AfterValidator(_opt_text)] = None,
                    ) -> dict[str, Any]:
        """Totals grouped by any of key, team, model, user, day (UTC) over [since, until)."""
        assert node.storage is not None
        groups = [g for g in group_by.split(",") if g]
        if node.ledger is not None:
            await asyncio.to_thread(node.ledger.flush)
        try:
            rows = await asyncio.to_thread(node.storage.usage_report, groups, since, until, key, team, model)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="group_by") from None
        return {"object": "list", "group_by": groups, "since": since, "until": until, "data": rows}

    @app.get("/admin/v1/workers", dependencies=guard)
    async def workers() -> dict[str, Any]:
        sup = node.supervisor
        data = [dataclasses.asdict(r.status()) for r in sup.replicas.values()] if sup else []
        return {"object": "list", "data": data}

    @app.get("/admin/v1/workers/{replica_id}/logs", dependencies=guard)
    async def worker_logs(replica_id: str, lines: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
        """The last lines of one replica's log (what the runtime printed)."""
        replica = node.supervisor.replicas.get(replica_id) if node.supervisor else None
        if replica is None:
            raise NotFound(f"no replica '{replica_id}'", code="replica_not_found")
        text = await asyncio.to_thread(tail_lines, replica.log_path, lines, 65536)
        return {"id": replica_id, "lines": text}

    @app.get("/admin/v1/gpus", dependencies=guard)
    async def gpus() -> dict[str, Any]:
        inv = node.inventory
        return {"object": "list", "driver": inv.driver, "error": inv.error, "data": [g.as_dict() for g in inv.gpus]}

    @app.get("/admin/v1/status", dependencies=guard)
    async def status() -> dict[str, Any]:
        ok, reasons = node.readiness()
        sup = node.supervisor
        inv = node.sampler.gpus or node.inventory  # the background sampler's latest NVML reading
        return {
            "node": {"name": node.config.node.name, "listen": node.config.node.listen, "version": __version__,
                     "uptime_s": round(time.time() - node.started_at, 1), "ready": ok, "reasons": reasons,
                     "keys": len(node.keys)},
            "models": [{"name": m.name, "runtime": m.runtime, "load": m.load} for m in node.config.models],
            "workers": [dataclasses.asdict(r.status()) for r in sup.replicas.values()] if sup else [],
            "gpus": {"driver": inv.driver, "error": inv.error, "data": [g.as_dict() for g in inv.gpus]},
            "traffic": node.sampler.window.traffic().as_dict(),
            "ledger": node.ledger.stats() if node.ledger is not None else None,
        }

    @app.post("/admin/v1/reload", dependencies=guard)
    async def reload() -> dict[str, Any]:
        """Re-read appliance.toml and models.lock; restart only the replicas whose spec changed."""
        return await node.reload()

    @app.post("/admin/v1/models/{name}/restart", dependencies=guard)
    async def restart_model(name: str) -> dict[str, Any]:
        if node.config.model(name) is None:
            raise NotFound(f"no model named '{name}'", code="model_not_found")
        n = node.supervisor.restart_model(name) if node.supervisor else 0
        return {"model": name, "restarting": n}

    @app.post("/admin/v1/models/{name}/load", dependencies=guard)
    async def load_model(name: str) -> dict[str, Any]:
        """Load an on-demand model now (evicting idle ones if it must); answers once it is ready."""
        if node.config.model(name) is None:
            raise NotFound(f"no model named '{name}'", code="model_not_found")
        if node.loader is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        seconds = await node.loader.load(name)
        return {"model": name, "state": "ready", "seconds": round(seconds, 3)}

    @app.post("/admin/v1/models/{name}/unload", dependencies=guard)
    async def unload_model(name: str) -> dict[str, Any]:
        """Unload (or put to sleep) an on-demand model now; answers once it is unloaded."""
        if node.config.model(name) is None:
            raise NotFound(f"no model named '{name}'", code="model_not_found")
        if node.loader is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        n = await node.loader.unload(name)
        return {"model": name, "state": "unloaded", "unloaded": n}

    @app.get("/admin/v1/fleet", dependencies=guard)
    async def fleet_status() -> dict[str, Any]:
        if node.fleet is None:
            return {"enabled": False, "reason": "no [fleet.litellm] section in appliance.toml"}
        return {**dataclasses.asdict(node.fleet.status), "ready_models": node.ready_models()}

    def fleet_or_400() -> None:
        if node.config.fleet.litellm is None:
            raise InvalidRequest("no [fleet.litellm] section in appliance.toml; add url and advertise_url there",
                                 code="fleet_not_configured")

    @app.post("/admin/v1/fleet/register", dependencies=guard)
    async def fleet_register() -> dict[str, Any]:
        fleet_or_400()
        await node.start_fleet(register=True)
        assert node.fleet is not None
        try:
            registered = await node.fleet.sync()
        except ProxyError as exc:
            node.fleet.status.last_error = str(exc)
            raise UpstreamError(str(exc), code="fleet_proxy_error", source="proxy") from None
        return {**dataclasses.asdict(node.fleet.status), "registered": registered}

    @app.post("/admin/v1/fleet/deregister", dependencies=guard)
    async def fleet_deregister() -> dict[str, Any]:
        fleet_or_400()
        if node.fleet is None:
            return {"removed": 0}
        node.fleet.status.registering = True  # deregister even when it was never started here
        removed = await node.fleet.stop(deregister=True, timeout=15.0)
        if node.fleet.status.last_error and node.fleet.status.last_error.startswith("deregistration failed"):
            raise UpstreamError(node.fleet.status.last_error, code="fleet_proxy_error", source="proxy")
        return {"removed": removed}

    @app.get("/admin/v1/fleet/config", dependencies=guard)
    async def fleet_config() -> dict[str, Any]:
        fleet_or_400()
        await node.start_fleet(register=False)
        secret = await node.fleet_key()
        deps = desired_deployments(node.config, secret, [m.name for m in node.config.models])
        return {"object": "list", "data": [d.body() for d in deps]}

    return app
