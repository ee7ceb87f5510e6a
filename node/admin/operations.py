"""Admin routes that run the node: status, workers, GPUs, reload and model loads and restarts."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Query, Request

from node.accounts.roles import Principal
from node.accounts.service import Accounts
from node.admin.access import audited, need
from node.admin.facade import Operations
from node.errors import NotFound
from node.workers.replica import tail_lines

LOG_BYTES = 65536   # the most of a replica's log one call reads


def add_status_routes(r: FastAPI, accounts: Accounts, ops: Operations) -> None:
    """What the node runs and how it is doing (read-only)."""

    @r.get("/admin/v1/workers")
    async def workers(_: Principal = need(accounts, "status.read")) -> dict[str, Any]:
        return {"object": "list", "data": ops.workers()}

    @r.get("/admin/v1/workers/{replica_id}/logs")
    async def worker_logs(replica_id: str, lines: int = Query(50, ge=1, le=500),
                          _: Principal = need(accounts, "status.read")) -> dict[str, Any]:
        """The last lines of one replica's log (what the runtime printed)."""
        path = ops.worker_log(replica_id)
        if path is None:
            raise NotFound(f"no replica '{replica_id}'", code="replica_not_found")
        text = await asyncio.to_thread(tail_lines, path, lines, LOG_BYTES)
        return {"id": replica_id, "lines": text}

    @r.get("/admin/v1/gpus")
    async def gpus(_: Principal = need(accounts, "status.read")) -> dict[str, Any]:
        return {"object": "list", **ops.gpus()}

    @r.get("/admin/v1/status")
    async def status(_: Principal = need(accounts, "status.read")) -> dict[str, Any]:
        return ops.status()


def add_model_routes(r: FastAPI, accounts: Accounts, ops: Operations) -> None:
    """Reload the configuration; restart, load and unload models (audited)."""

    def model_or_404(name: str) -> None:
        if not ops.has_model(name):
            raise NotFound(f"no model named '{name}'", code="model_not_found")

    @r.post("/admin/v1/reload")
    async def reload(request: Request, _: Principal = need(accounts, "config.reload")) -> dict[str, Any]:
        """Re-read appliance.toml and models.lock; restart only the replicas whose spec changed."""
        summary = await ops.reload()
        await audited(accounts, request, "config.reload", ops.config_path(), summary)
        return summary

    @r.post("/admin/v1/models/{name}/restart")
    async def restart_model(name: str, request: Request, _: Principal = need(accounts, "models.operate")) -> dict[str, Any]:
        model_or_404(name)
        n = ops.restart_model(name)
        await audited(accounts, request, "models.restart", name, {"replicas": n})
        return {"model": name, "restarting": n}

    @r.post("/admin/v1/models/{name}/load")
    async def load_model(name: str, request: Request, _: Principal = need(accounts, "models.operate")) -> dict[str, Any]:
        """Load an on-demand model now (evicting idle ones if it must); answers once it is ready."""
        model_or_404(name)
        seconds = round(await ops.load_model(name), 3)
        await audited(accounts, request, "models.load", name, {"seconds": seconds})
        return {"model": name, "state": "ready", "seconds": seconds}

    @r.post("/admin/v1/models/{name}/unload")
    async def unload_model(name: str, request: Request, _: Principal = need(accounts, "models.operate")) -> dict[str, Any]:
        """Unload (or put to sleep) an on-demand model now; answers once it is unloaded."""
        model_or_404(name)
        n = await ops.unload_model(name)
        await audited(accounts, request, "models.unload", name, {"unloaded": n})
        return {"model": name, "state": "unloaded", "unloaded": n}
