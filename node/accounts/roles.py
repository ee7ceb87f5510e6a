"""Roles of admin tokens and what each may do: one table, one check (`allowed`).

Three roles, each a superset of the one below: `viewer` reads; `operator` also runs
the node (models, reload, fleet); `admin` also manages tokens, keys, teams and plans.
A token bound to a team is limited further: it may only do the actions marked
team-scoped here, and only on its own team's keys and usage (the caller checks the
target; `allowed` checks the action).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.IntEnum):
    """Ordered: a higher role may do everything a lower one may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value.upper()]
        except KeyError:
            raise ValueError(f"unknown role {value!r}; use admin, operator or viewer") from None


@dataclass(frozen=True)
class Rule:
    """The lowest role an action needs, and whether a team-bound token may do it."""

    role: Role
    team_scoped: bool


# The one table: every admin route names one of these actions.
ACTIONS: dict[str, Rule] = {
    "status.read": Rule(Role.VIEWER, True),        # status, workers, GPUs, models, openapi
    "usage.read": Rule(Role.VIEWER, True),         # a team token sees only its team's rows
    "keys.read": Rule(Role.VIEWER, True),          # never secrets
    "teams.read": Rule(Role.VIEWER, True),         # a team token sees only its own team
    "plans.read": Rule(Role.VIEWER, True),
    "audit.read": Rule(Role.VIEWER, False),        # the log names every team
    "fleet.read": Rule(Role.VIEWER, False),
    "models.operate": Rule(Role.OPERATOR, False),  # load, unload, restart
    "config.reload": Rule(Role.OPERATOR, False),
    "fleet.manage": Rule(Role.OPERATOR, False),    # register, deregister
    "fleet.secret": Rule(Role.ADMIN, False),       # the proxy's config: reveals (or mints) the fleet key's secret
    "keys.manage": Rule(Role.ADMIN, True),         # a team admin: only its team's keys
    "teams.manage": Rule(Role.ADMIN, False),
    "plans.manage": Rule(Role.ADMIN, False),
    "tokens.manage": Rule(Role.ADMIN, False),      # tokens are node-wide power: never team-scoped
    "batches.read": Rule(Role.VIEWER, True),       # a team token sees only its team's batches
    "batches.manage": Rule(Role.OPERATOR, True),   # cancel; a team token only its team's
}


@dataclass(frozen=True)
class Principal:
    """Who is calling the admin API: a token's id, its role and its team (None: every team)."""

    id: str
    role: Role
    team: str | None = None

    def sees_team(self, team: str | None) -> bool:
        """Whether this caller may see or touch something belonging to `team`."""
        return self.team is None or self.team == team


def allowed(role: Role, action: str, team_bound: bool = False) -> bool:
    """Whether `role` (bound to a team or not) may do `action`; unknown actions are refused."""
    rule = ACTIONS.get(action)
    if rule is None:
        return False
    return role >= rule.role and (rule.team_scoped or not team_bound)


def may(principal: Principal, action: str) -> bool:
    """`allowed` for a principal."""
    return allowed(principal.role, action, principal.team is not None)
