"""Admin routes for teams: shared limits of their keys (every write audited)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request

from node.accounts.roles import Principal
from node.accounts.service import Accounts
from node.accounts.teams import TeamRecord
from node.admin.access import audited, need
from node.admin.paging import MAX_LIMIT, Paging, listing, paging
from node.admin.protocol import TeamCreate, TeamUpdate
from node.errors import NotFound


def team_or_404(accounts: Accounts, name: str, who: Principal) -> TeamRecord:
    team = accounts.team(name)
    if team is None or not who.sees_team(name):
        raise NotFound(f"no team named '{name}'", code="team_not_found")
    return team


def add_team_routes(r: FastAPI, accounts: Accounts) -> None:
    """Create, list, read, change and delete teams."""

    @r.post("/admin/v1/teams", status_code=201)
    async def create_team(body: TeamCreate, request: Request, _: Principal = need(accounts, "teams.manage")) -> dict[str, Any]:
        accounts.check_plan(body.plan)
        team = TeamRecord(**body.model_dump(exclude_none=True))
        await accounts.create_team(team)
        await audited(accounts, request, "teams.create", team.name, team.public())
        return team.public()

    @r.get("/admin/v1/teams")
    async def list_teams(who: Principal = need(accounts, "teams.read"), at: Paging = Depends(paging)) -> dict[str, Any]:
        """A page of the teams the caller may see, by name."""
        page = accounts.list_teams(who, at.offset, at.limit)
        return listing(page.data, TeamRecord.public, at, has_more=page.has_more, total=page.total)

    @r.get("/admin/v1/teams/{name}")
    async def get_team(name: str, who: Principal = need(accounts, "teams.read")) -> dict[str, Any]:
        """A team and the ids of its keys (the first MAX_LIMIT; `key_count` counts them all)."""
        team = team_or_404(accounts, name, who)
        keys = accounts.team_keys(name)
        return {**team.public(), "keys": keys[:MAX_LIMIT], "key_count": len(keys)}

    @r.patch("/admin/v1/teams/{name}")
    async def update_team(name: str, body: TeamUpdate, request: Request,
                          who: Principal = need(accounts, "teams.manage")) -> dict[str, Any]:
        changes = body.model_dump(exclude_unset=True)
        for field in ("metadata", "budget_period"):
            if field in changes and changes[field] is None:
                changes.pop(field)
        accounts.check_plan(changes.get("plan"))
        team = team_or_404(accounts, name, who).updated(**changes)
        await accounts.save_team(team)
        await audited(accounts, request, "teams.update", name, changes)
        return team.public()

    @r.delete("/admin/v1/teams/{name}")
    async def delete_team(name: str, request: Request, who: Principal = need(accounts, "teams.manage")) -> dict[str, Any]:
        """Remove a team's limits; its keys keep the team name (for usage) and their own limits."""
        team_or_404(accounts, name, who)
        await accounts.delete_team(name)
        await audited(accounts, request, "teams.delete", name, {})
        return {"name": name, "deleted": True}
