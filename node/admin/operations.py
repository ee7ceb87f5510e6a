"""Admin routes that run the node: status, workers, GPUs, reload, model restarts, the fleet."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request

from node import __version__
from node.accounts.roles import Principal
from node.admin.access import audited, need
from node.errors import InvalidRequest, NoReadyReplica, NotFound, UpstreamError
from node.ops.fleet import ProxyError, desired_deployments
from node.workers.replica import tail_lines

if TYPE_CHECKING:  # the running Node is handed in; only node/app.py and node/server.py import the wiring
    from node.app import Node


def add_operation_routes(r: FastAPI, node: Node) -> None:
    """Add these routes to the admin app."""

    @r.get("/admin/v1/workers")
    async def workers(_: Principal = need(node, "status.read")) -> dict[str, Any]:
        sup = node.supervisor
        data = [dataclasses.asdict(x.status()) for x in sup.replicas.values()] if sup else []
        return {"object": "list", "data": data}

    @r.get("/admin/v1/workers/{replica_id}/logs")
    async def worker_logs(replica_id: str, lines: int = Query(50, ge=1, le=500),
                          _: Principal = need(node, "status.read")) -> dict[str, Any]:
        """The last lines of one replica's log (what the runtime printed)."""
        replica = node.supervisor.replicas.get(replica_id) if node.supervisor else None
        if replica is None:
            raise NotFound(f"no replica '{replica_id}'", code="replica_not_found")
        text = await asyncio.to_thread(tail_lines, replica.log_path, lines, 65536)
        return {"id": replica_id, "lines": text}

    @r.get("/admin/v1/gpus")
    async def gpus(_: Principal = need(node, "status.read")) -> dict[str, Any]:
        inv = node.inventory
        return {"object": "list", "driver": inv.driver, "error": inv.error, "data": [g.as_dict() for g in inv.gpus]}

    @r.get("/admin/v1/status")
    async def status(who: Principal = need(node, "status.read")) -> dict[str, Any]:
        ok, reasons = node.readiness()
        sup = node.supervisor
        inv = node.sampler.gpus or node.inventory  # the background sampler's latest NVML reading
        return {
            "node": {"name": node.config.node.name, "listen": node.config.node.listen, "version": __version__,
                     "uptime_s": round(time.time() - node.started_at, 1), "ready": ok, "reasons": reasons,
                     "keys": len(node.keys)},
            "models": [{"name": m.name, "runtime": m.runtime, "load": m.load} for m in node.config.models],
            "workers": [dataclasses.asdict(x.status()) for x in sup.replicas.values()] if sup else [],
            "gpus": {"driver": inv.driver, "error": inv.error, "data": [g.as_dict() for g in inv.gpus]},
            "traffic": node.sampler.window.traffic().as_dict(),
            "ledger": node.ledger.stats() if node.ledger is not None else None,
            "queue": [m for m in waiting(node, who, None, 10) if m["inflight"] or m["queued"]],
        }

    @r.get("/admin/v1/queue")
    async def queue(model: str | None = Query(None, max_length=200), limit: int = Query(100, ge=1, le=1000),
                    who: Principal = need(node, "status.read")) -> dict[str, Any]:
        """Who waits for each model's slots: per tenant and priority, the longest lines first (`limit` rows per model)."""
        if model is not None and (node.gateway is None or model not in node.gateway.gates):
            raise NotFound(f"no model '{model}'", code="model_not_found")
        return {"object": "list", "data": waiting(node, who, model, limit)}

    @r.post("/admin/v1/reload")
    async def reload(request: Request, _: Principal = need(node, "config.reload")) -> dict[str, Any]:
        """Re-read appliance.toml and models.lock; restart only the replicas whose spec changed."""
        summary = await node.reload()
        await audited(node, request, "config.reload", str(node.config.path), summary)
        return summary

    @r.post("/admin/v1/models/{name}/restart")
    async def restart_model(name: str, request: Request, _: Principal = need(node, "models.operate")) -> dict[str, Any]:
        if node.config.model(name) is None:
            raise NotFound(f"no model named '{name}'", code="model_not_found")
        n = node.supervisor.restart_model(name) if node.supervisor else 0
        await audited(node, request, "models.restart", name, {"replicas": n})
        return {"model": name, "restarting": n}

    @r.post("/admin/v1/models/{name}/load")
    async def load_model(name: str, request: Request, _: Principal = need(node, "models.operate")) -> dict[str, Any]:
        """Load an on-demand model now (evicting idle ones if it must); answers once it is ready."""
        if node.config.model(name) is None:
            raise NotFound(f"no model named '{name}'", code="model_not_found")
        if node.loader is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        seconds = await node.loader.load(name)
        await audited(node, request, "models.load", name, {"seconds": round(seconds, 3)})
        return {"model": name, "state": "ready", "seconds": round(seconds, 3)}

    @r.post("/admin/v1/models/{name}/unload")
    async def unload_model(name: str, request: Request, _: Principal = need(node, "models.operate")) -> dict[str, Any]:
        """Unload (or put to sleep) an on-demand model now; answers once it is unloaded."""
        if node.config.model(name) is None:
            raise NotFound(f"no model named '{name}'", code="model_not_found")
        if node.loader is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        n = await node.loader.unload(name)
        await audited(node, request, "models.unload", name, {"unloaded": n})
        return {"model": name, "state": "unloaded", "unloaded": n}

    @r.get("/admin/v1/fleet")
    async def fleet_status(_: Principal = need(node, "fleet.read")) -> dict[str, Any]:
        if node.fleet is None:
            return {"enabled": False, "reason": "no [fleet.litellm] section in appliance.toml"}
        return {**dataclasses.asdict(node.fleet.status), "ready_models": node.ready_models()}

    def fleet_or_400() -> None:
        if node.config.fleet.litellm is None:
            raise InvalidRequest("no [fleet.litellm] section in appliance.toml; add url and advertise_url there",
                                 code="fleet_not_configured")

    @r.post("/admin/v1/fleet/register")
    async def fleet_register(request: Request, _: Principal = need(node, "fleet.manage")) -> dict[str, Any]:
        fleet_or_400()
        await node.start_fleet(register=True)
        assert node.fleet is not None
        try:
            registered = await node.fleet.sync()
        except ProxyError as exc:
            node.fleet.status.last_error = str(exc)
            raise UpstreamError(str(exc), code="fleet_proxy_error", source="proxy") from None
        await audited(node, request, "fleet.register", node.config.fleet.litellm.url if node.config.fleet.litellm else "",
                      {"registered": registered})
        return {**dataclasses.asdict(node.fleet.status), "registered": registered}

    @r.post("/admin/v1/fleet/deregister")
    async def fleet_deregister(request: Request, _: Principal = need(node, "fleet.manage")) -> dict[str, Any]:
        fleet_or_400()
        if node.fleet is None:
            return {"removed": 0}
        node.fleet.status.registering = True  # deregister even when it was never started here
        removed = await node.fleet.stop(deregister=True, timeout=15.0)
        if node.fleet.status.last_error and node.fleet.status.last_error.startswith("deregistration failed"):
            raise UpstreamError(node.fleet.status.last_error, code="fleet_proxy_error", source="proxy")
        await audited(node, request, "fleet.deregister", node.config.fleet.litellm.url if node.config.fleet.litellm else "",
                      {"removed": removed})
        return {"removed": removed}

    @r.get("/admin/v1/fleet/config")
    async def fleet_config(_: Principal = need(node, "fleet.manage")) -> dict[str, Any]:
        fleet_or_400()
        await node.start_fleet(register=False)
        secret = await node.fleet_key()
        deps = desired_deployments(node.config, secret, [m.name for m in node.config.models])
        return {"object": "list", "data": [d.body() for d in deps]}



def waiting(node: Node, who: Principal, model: str | None, limit: int) -> list[dict[str, Any]]:
    """Each model's slots in use and who waits for them (at most `limit` rows a model, the longest lines first).

    A team token sees only its own team's line (tenants are team names, or key:ID for keys without a team).
    """
    gates = node.gateway.gates if node.gateway is not None else {}
    data = []
    for name, q in gates.items():
        if model is not None and name != model:
            continue
        if who.team is None:
            rows, queued = q.waiting(limit), q.queued
        else:
            rows = [w for w in q.waiting(1 << 30) if w["tenant"] == who.team][:limit]
            queued = sum(w["waiting"] for w in rows)
        data.append({"model": name, "inflight": q.inflight, "queued": queued, "waiting": rows})
    return data
