"""Who is acting: an admin token (with its role) or an API key, as the console and the admin side see it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a session acts for: an admin token (with its role) or an API key."""

    kind: str                   # "admin" (an admin token) or "key" (an API key)
    role: str                   # admin | operator | viewer for tokens; "key" for API keys
    id: str
    name: str
    team: str | None
    secret: str = field(repr=False)

    def public(self) -> dict[str, str | None]:
        return {"kind": self.kind, "role": self.role, "id": self.id, "name": self.name, "team": self.team}
