"""Admin routes for the fleet (a LiteLLM proxy): status, register, deregister, and the deployments it needs.

The deployments carry the fleet key's secret, so reading them is for admins only and
every reveal (and every mint of a new fleet key) is an audit record.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from node.accounts.roles import Principal
from node.accounts.service import Accounts
from node.admin.access import audited, need
from node.admin.facade import Operations
from node.errors import InvalidRequest


def add_fleet_routes(r: FastAPI, accounts: Accounts, ops: Operations) -> None:
    """Fleet status, registration, and the proxy's configuration."""

    def proxy_or_400() -> str:
        url = ops.fleet_proxy()
        if url is None:
            raise InvalidRequest("no [fleet.litellm] section in appliance.toml; add url and advertise_url there",
                                 code="fleet_not_configured")
        return url

    @r.get("/admin/v1/fleet")
    async def fleet_status(_: Principal = need(accounts, "fleet.read")) -> dict[str, Any]:
        return ops.fleet_status()

    @r.post("/admin/v1/fleet/register")
    async def fleet_register(request: Request, _: Principal = need(accounts, "fleet.manage")) -> dict[str, Any]:
        url = proxy_or_400()
        status = await ops.fleet_register()
        await audited(accounts, request, "fleet.register", url, {"registered": status["registered"]})
        return status

    @r.post("/admin/v1/fleet/deregister")
    async def fleet_deregister(request: Request, _: Principal = need(accounts, "fleet.manage")) -> dict[str, Any]:
        url = proxy_or_400()
        removed = await ops.fleet_deregister()
        await audited(accounts, request, "fleet.deregister", url, {"removed": removed})
        return {"removed": removed}

    @r.get("/admin/v1/fleet/config")
    async def fleet_config(request: Request, _: Principal = need(accounts, "fleet.secret")) -> dict[str, Any]:
        """The proxy's deployments for this node, with the fleet key's secret (made if it is gone or revoked)."""
        proxy_or_400()
        key_id, minted, deployments = await ops.fleet_deployments()  # a mint is audited where it happens
        await audited(accounts, request, "fleet.key.reveal", key_id, {"minted": minted})
        return {"object": "list", "data": deployments}
