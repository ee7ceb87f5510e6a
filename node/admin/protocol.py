"""Wire types of the admin API (request bodies), shared by the API and the CLI client.

Every field is bounded to what both databases hold and what makes sense: integers are
signed 64-bit at most (most far less), times and numbers finite, strings valid Unicode
without NUL (PostgreSQL's text refuses it) and of a bounded length, metadata a small
JSON object. Anything else is a 422 naming the field, never a database error.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

INT64_MAX = 2**63 - 1
MAX_RATE = 10**9            # requests per minute
MAX_TOKENS_RATE = 10**15    # tokens per minute
MAX_PARALLEL = 10**6
MAX_TIME = 253402300799.0   # 9999-12-31T23:59:59Z, as unix time
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 8
MAX_MODELS = 1000


def check_text(v: str) -> str:
    """A string both databases store as given: valid Unicode (no lone surrogates), no NUL."""
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (a lone surrogate is not)") from None
    return v


def _metadata(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """Small, finite, storable JSON: at most MAX_METADATA_BYTES encoded and MAX_METADATA_DEPTH deep."""
    if v is None:
        return v

    def walk(x: Any, depth: int) -> None:
        if depth > MAX_METADATA_DEPTH:
            raise ValueError(f"is nested deeper than {MAX_METADATA_DEPTH} levels")
        if isinstance(x, dict):
            for k, item in x.items():
                check_text(k)
                walk(item, depth + 1)
        elif isinstance(x, list):
            for item in x:
                walk(item, depth + 1)
        elif isinstance(x, str):
            check_text(x)
        elif isinstance(x, float) and not math.isfinite(x):
            raise ValueError("numbers must be finite")
        elif isinstance(x, int) and not isinstance(x, bool) and abs(x) > INT64_MAX:
            raise ValueError("integers must fit in 64 bits")

    walk(v, 1)
    if len(json.dumps(v)) > MAX_METADATA_BYTES:
        raise ValueError(f"is larger than {MAX_METADATA_BYTES} bytes as JSON")
    return v


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(check_text)]
Rpm = Annotated[int, Field(ge=0, le=MAX_RATE)]
Tpm = Annotated[int, Field(ge=0, le=MAX_TOKENS_RATE)]
Parallel = Annotated[int, Field(ge=0, le=MAX_PARALLEL)]
Tokens = Annotated[int, Field(ge=0, le=INT64_MAX)]
UnixTime = Annotated[float, Field(ge=0, le=MAX_TIME, allow_inf_nan=False)]
Metadata = Annotated[dict[str, Any] | None, AfterValidator(_metadata)]


class KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    team: Name | None = None
    models: list[Name] | None = Field(default=None, max_length=MAX_MODELS,
                                      description="models this key may use; null = all")
    rpm: Rpm | None = None
    tpm: Tpm | None = None
    max_parallel: Parallel | None = None
    budget_tokens: Tokens | None = None
    budget_period: Literal["day", "month"] | None = None
    user_rpm: Rpm | None = None
    user_tpm: Tpm | None = None
    expires_at: UnixTime | None = Field(default=None, description="unix time")
    metadata: Metadata = Field(default=None, description=f"a JSON object of at most {MAX_METADATA_BYTES} bytes")
    plan: Name | None = Field(default=None, description="a plan's name; fields set here override it")
    budget_usd: float | None = Field(default=None, ge=0, le=1e12, allow_inf_nan=False,
                                     description="money budget per period (USD)")
    share: float | None = Field(default=None, gt=0, le=1_000_000, allow_inf_nan=False,
                                description="weight in the fair order between tenants (default 1)")
    priority: Literal["interactive", "batch"] | None = None


class KeyCreate(KeyFields):
    name: Name


class KeyUpdate(KeyFields):
    name: Name | None = None
    revoked: bool | None = None


class TeamFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rpm: Rpm | None = None
    tpm: Tpm | None = None
    max_parallel: Parallel | None = None
    budget_tokens: Tokens | None = None
    budget_period: Literal["day", "month"] | None = None
    metadata: Metadata = Field(default=None, description=f"a JSON object of at most {MAX_METADATA_BYTES} bytes")
    plan: Name | None = None
    budget_usd: float | None = Field(default=None, ge=0, le=1e12, allow_inf_nan=False)
    share: float | None = Field(default=None, gt=0, le=1_000_000, allow_inf_nan=False,
                                description="weight in the fair order between tenants (default 1)")
    priority: Literal["interactive", "batch"] | None = None


class TeamCreate(TeamFields):
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")]


class TeamUpdate(TeamFields):
    pass


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: int = Field(default=0, ge=0, le=30 * 86400, description="seconds the old secret stays valid")


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    role: Literal["admin", "operator", "viewer"]
    team: str | None = Field(default=None, min_length=1, max_length=200, pattern=NAME_PATTERN)


class PlanFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[Name] | None = Field(default=None, max_length=1000,
                                      description="model names or group:NAME; null = all")
    rpm: Rpm | None = None
    tpm: Tpm | None = None
    max_parallel: Parallel | None = None
    budget_tokens: Tokens | None = None
    budget_usd: float | None = Field(default=None, ge=0, le=1e12, allow_inf_nan=False)
    budget_period: Literal["day", "month"] | None = None
    metadata: Metadata = Field(default=None, description=f"a JSON object of at most {MAX_METADATA_BYTES} bytes")
    share: float | None = Field(default=None, gt=0, le=1_000_000, allow_inf_nan=False,
                                description="weight in the fair order between tenants (default 1)")
    priority: Literal["interactive", "batch"] | None = None


class PlanCreate(PlanFields):
    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)


class PlanUpdate(PlanFields):
    pass
