"""An OpenAI-compatible server the node does not launch (`runtime = "external"`).

The node only probes it (`GET {url}/models`) and routes to it, behind the same keys,
quotas and metrics as its own workers. With an API key (the model's `api_key_env`) every
request to it, probes included, carries `Authorization: Bearer KEY`.
"""

from __future__ import annotations

from runtimes import LaunchPlan, ModelLayout, Probe, WorkerSpec

NAME = "external"
LAYOUT: ModelLayout | None = None  # the node launches nothing and pins no model
# A server of unknown size: as many as a model's default max_inflight, so the node adds no wait of its own
# (set the model's `concurrency` to what the server really serves at once, for the node's order to count).
DEFAULT_CONCURRENCY = 64


def plan(spec: WorkerSpec) -> LaunchPlan:
    if not spec.url:
        raise ValueError("external needs url")
    base = spec.url.rstrip("/")
    root, _, prefix = base.partition("://")
    host, slash, path = prefix.partition("/")
    root_url = f"{root}://{host}"
    models_path = ("/" + path if slash else "") + "/models"
    return LaunchPlan(
        argv=(),
        env={},
        root_url=root_url,
        openai_base=base,
        health=Probe(models_path),
        ready=Probe(models_path),
        startup_timeout_s=spec.startup_timeout_s or 30.0,
        upstream_model=None,
        headers=(("authorization", f"Bearer {spec.api_key}"),) if spec.api_key else (),
        concurrency=spec.concurrency or DEFAULT_CONCURRENCY,
    )


def version_argv(spec: WorkerSpec) -> tuple[str, ...]:
    return ()
