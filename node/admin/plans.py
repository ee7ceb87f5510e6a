"""Admin routes for plans: named sets of limits that keys and teams follow (every write audited)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request

from node.accounts.plans import PlanRecord
from node.accounts.roles import Principal
from node.accounts.service import Accounts
from node.admin.access import audited, need
from node.admin.keys import Conflict
from node.admin.paging import Paging, listing, paging
from node.admin.protocol import PlanCreate, PlanUpdate
from node.errors import NotFound


def plan_or_404(accounts: Accounts, name: str) -> PlanRecord:
    plan = accounts.plans().get(name)
    if plan is None:
        raise NotFound(f"no plan named '{name}'", code="plan_not_found")
    return plan


def add_plan_routes(r: FastAPI, accounts: Accounts) -> None:
    """Create, list, read, change and delete plans."""

    @r.post("/admin/v1/plans", status_code=201)
    async def create_plan(body: PlanCreate, request: Request, _: Principal = need(accounts, "plans.manage")) -> dict[str, Any]:
        accounts.check_models(body.models)
        fields = body.model_dump(exclude_none=True)
        if "models" in fields:
            fields["models"] = tuple(fields["models"])
        plan = PlanRecord(**fields)
        await accounts.save_plan(plan, new=True)
        await audited(accounts, request, "plans.create", plan.name, plan.public())
        return plan.public()

    @r.get("/admin/v1/plans")
    async def list_plans(_: Principal = need(accounts, "plans.read"), at: Paging = Depends(paging)) -> dict[str, Any]:
        """A page of plans, by name (appliance.toml's and stored ones)."""
        page = accounts.list_plans(at.offset, at.limit)
        return listing(page.data, PlanRecord.public, at, has_more=page.has_more, total=page.total)

    @r.get("/admin/v1/plans/{name}")
    async def get_plan(name: str, _: Principal = need(accounts, "plans.read")) -> dict[str, Any]:
        return plan_or_404(accounts, name).public()

    @r.patch("/admin/v1/plans/{name}")
    async def update_plan(name: str, body: PlanUpdate, request: Request,
                          _: Principal = need(accounts, "plans.manage")) -> dict[str, Any]:
        """Change a plan; every key and team on it follows within a second."""
        accounts.check_models(body.models)
        changes = body.model_dump(exclude_unset=True)
        for field in ("metadata", "budget_period"):
            if field in changes and changes[field] is None:
                changes.pop(field)
        if changes.get("models") is not None:
            changes["models"] = tuple(changes["models"])
        plan = plan_or_404(accounts, name).updated(**changes)
        await accounts.save_plan(plan, new=False)
        await audited(accounts, request, "plans.update", name, changes)
        return plan.public()

    @r.delete("/admin/v1/plans/{name}")
    async def delete_plan(name: str, request: Request, _: Principal = need(accounts, "plans.manage")) -> dict[str, Any]:
        plan_or_404(accounts, name)
        users = accounts.plan_users(name)
        if users:
            raise Conflict(f"plan '{name}' is used by {len(users)} key(s) (e.g. {users[0]}); move them first")
        if not await accounts.delete_plan(name):
            raise Conflict(f"plan '{name}' comes from appliance.toml; remove it there and reload")
        await audited(accounts, request, "plans.delete", name, {})
        return {"name": name, "deleted": True}
