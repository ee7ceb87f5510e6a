"""`[quotas.default]` and `[plans.NAME]`: the limits and budgets keys and teams take."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from node.config.base import _Section


class QuotaSettings(_Section):
    # Requests per minute (sliding window).
    rpm: Annotated[int, Field(ge=0)] | None = None
    # Prompt + completion tokens per minute.
    tpm: Annotated[int, Field(ge=0)] | None = None
    # Requests in flight at once.
    max_parallel: Annotated[int, Field(ge=0)] | None = None
    # Tokens per budget period.
    budget_tokens: Annotated[int, Field(ge=0)] | None = None
    # The budget's period, in UTC.
    budget_period: Literal["day", "month"] = "day"
    # Requests per minute per end user (the request's `user` field) under one key, e.g. a fleet key.
    user_rpm: Annotated[int, Field(ge=0)] | None = None
    # Tokens per minute per end user.
    user_tpm: Annotated[int, Field(ge=0)] | None = None


class PlanSettings(_Section):
    """`[plans.NAME]`: models (names or group:NAME), limits and budgets that keys and teams take by name."""

    # Models the plan's keys may use: names, or "group:NAME" from [model_groups]; absent: all.
    models: list[str] | None = None
    # Requests per minute per key (a key's own value wins).
    rpm: Annotated[int, Field(ge=0)] | None = None
    # Tokens per minute per key.
    tpm: Annotated[int, Field(ge=0)] | None = None
    # Requests in flight at once per key.
    max_parallel: Annotated[int, Field(ge=0)] | None = None
    # Tokens per budget period per key.
    budget_tokens: Annotated[int, Field(ge=0)] | None = None
    # Money (USD, from the models' prices) per budget period per key.
    budget_usd: Annotated[float, Field(ge=0)] | None = None
    # day or month (UTC).
    budget_period: Literal["day", "month"] = "day"
    # Weight in the fair order between tenants waiting for a model (a key's or team's own value wins; default 1).
    share: Annotated[float, Field(gt=0, le=1_000_000)] | None = None
    # "interactive" or "batch" (served when no interactive request waits, above a floor); default interactive.
    priority: Literal["interactive", "batch"] | None = None
