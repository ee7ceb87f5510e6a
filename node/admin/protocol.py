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
    plan: str | None = Field(default=None, max_length=200, description="a plan's name; fields set here override it")
    budget_usd: float | None = Field(default=None, ge=0, le=1e12, description="money budget per period (USD)")


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
    plan: str | None = Field(default=None, max_length=200)
    budget_usd: float | None = Field(default=None, ge=0, le=1e12)


class TeamCreate(TeamFields):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")


class TeamUpdate(TeamFields):
    pass


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: int = Field(default=0, ge=0, le=30 * 86400, description="seconds the old secret stays valid")


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "operator", "viewer"]
    team: str | None = Field(default=None, min_length=1, max_length=200, pattern=NAME_PATTERN)


class PlanFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] | None = Field(default=None, max_length=1000,
                                     description="model names or group:NAME; null = all")
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    max_parallel: int | None = Field(default=None, ge=0)
    budget_tokens: int | None = Field(default=None, ge=0)
    budget_usd: float | None = Field(default=None, ge=0, le=1e12)
    budget_period: Literal["day", "month"] | None = None
    metadata: dict[str, Any] | None = None


class PlanCreate(PlanFields):
    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)


class PlanUpdate(PlanFields):
    pass
