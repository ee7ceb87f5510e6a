"""What the supervisor asks a worker: liveness/readiness probes, a one-token inference
probe, and warm-up steps run once after health passes (e.g. loading an Ollama model)."""

from __future__ import annotations

import httpx

from runtimes import LaunchPlan, Probe, Warmup

INFERENCE_PROMPT = "ping"


async def check(client: httpx.AsyncClient, plan: LaunchPlan, probe: Probe, timeout: float) -> str:
    """'' when a GET probe passes, else why not."""
    try:
        r = await client.get(plan.root_url + probe.path, timeout=timeout, headers=dict(plan.headers))
    except httpx.HTTPError as exc:
        return f"{probe.path}: {type(exc).__name__}"
    if r.status_code != 200:
        return f"{probe.path}: HTTP {r.status_code}"
    if probe.expect_model:
        try:
            ids = [m.get("id") for m in r.json().get("data", [])]
        except (ValueError, AttributeError):
            return f"{probe.path}: not a model list"
        if probe.expect_model not in ids:
            return f"{probe.path}: {probe.expect_model} not listed yet"
    return ""


async def infer(client: httpx.AsyncClient, plan: LaunchPlan, model: str, timeout: float) -> str:
    """'' when a real one-token completion succeeds, else why not (catches a hung engine
    that still answers its health route)."""
    body = {"model": plan.upstream_model or model, "prompt": INFERENCE_PROMPT, "max_tokens": 1, "temperature": 0}
    try:
        r = await client.post(plan.openai_base + "/completions", json=body, timeout=timeout, headers=dict(plan.headers))
    except httpx.HTTPError as exc:
        return f"inference probe: {type(exc).__name__}"
    if r.status_code != 200:
        return f"inference probe: HTTP {r.status_code} {r.text[:200]}"
    try:
        choices = r.json()["choices"]
    except (ValueError, KeyError, TypeError):
        return "inference probe: not a completion"
    return "" if choices else "inference probe: no choices"


async def warm(client: httpx.AsyncClient, plan: LaunchPlan, step: Warmup, timeout: float) -> str:
    """Send one warm-up request the adapter described; '' when it answered 200, else why not."""
    try:
        r = await client.post(plan.root_url + step.path, json=dict(step.body), timeout=timeout)
    except httpx.HTTPError as exc:
        return f"warm-up {step.path}: {type(exc).__name__}"
    if r.status_code != 200:
        return f"warm-up {step.path}: HTTP {r.status_code} {r.text[:200]}"
    return ""
