"""Wire types of the admin API (request bodies), shared by the API and the CLI client."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    team: str | None = None
    models: list[str] | None = Field(default=None, description="models this key may use; null = all")
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    max_parallel: int | None = Field(default=None, ge=0)
    budget_tokens: int | None = Field(default=None, ge=0)
    budget_period: Literal["day", "month"] | None = None
    user_rpm: int | None = Field(default=None, ge=0)
    user_tpm: int | None = Field(default=None, ge=0)
    expires_at: float | None = Field(default=None, description="unix time")
    metadata: dict[str, Any] | None = None


class KeyCreate(KeyFields):
    name: str = Field(min_length=1, max_length=200)


class KeyUpdate(KeyFields):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    revoked: bool | None = None


class TeamFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    max_parallel: int | None = Field(default=None, ge=0)
    budget_tokens: int | None = Field(default=None, ge=0)
    budget_period: Literal["day", "month"] | None = None
    metadata: dict[str, Any] | None = None


class TeamCreate(TeamFields):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")


class TeamUpdate(TeamFields):
    pass
