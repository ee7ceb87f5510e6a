"""The Grafana dashboard: valid, importable JSON whose every query uses metrics the node exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from node.ops.metrics import Metrics, exported_names
from node.workers.gpus import discover
from tests.fakes.nvml import box

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "infernode.json"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (strings, matchers, ranges and groupings removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", e):
        word = m.group(1)
        if word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def node_exports() -> set[str]:
    """What a node exports when every family has a sample (a fake NVML box and some traffic)."""
    m = Metrics()
    m.set_gpus(discover(box(2)))
    m.requests.labels("m", "200").inc()
    m.duration.labels("m").observe(0.1)
    m.ttft.labels("m").observe(0.1)
    m.tokens.labels("m", "prompt").inc()
    m.inflight.labels("m").set(0)
    m.worker_up.labels("m", "0", "vllm").set(1)
    m.worker_restarts.labels("m", "0").inc()
    m.quota_rejections.labels("key_rpm").inc()
    return exported_names(m.collect())


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.95, sum by (model, le) (rate(a_bucket{x=~"5.."}[$__rate_interval])))') == {"a_bucket"}
    assert metric_names("a / clamp_min(sum(b{c=\"d\"}), 1e-9) and on(x) c") == {"a", "b", "c"}


def test_dashboard_is_importable_json():
    d = json.loads(DASHBOARD.read_text())
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int) and d.get("id") is None
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"] and t["expr"], p["title"]


def test_every_query_uses_exported_metrics():
    d = json.loads(DASHBOARD.read_text())
    exported = node_exports()
    queries = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in d["templating"]["list"] if v.get("definition")]
    used = set()
    for q in queries:
        lv = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
        if lv:  # a variable's query: label_values(selector, label)
            assert lv.group(2) in ("instance", "model"), q
            q = lv.group(1)
        names = metric_names(q)
        unknown = names - exported
        assert not unknown, f"{q}: {unknown} not exported by the node"
        used |= names
    # The panels the issue asks for are all there.
    for name in ("infernode_requests_total", "infernode_request_duration_seconds_bucket",
                 "infernode_time_to_first_token_seconds_bucket", "infernode_tokens_total", "infernode_gpu_memory_used_bytes",
                 "infernode_gpu_memory_total_bytes", "infernode_gpu_utilization_ratio", "infernode_worker_restarts_total",
                 "infernode_quota_rejections_total", "infernode_worker_up", "infernode_inflight_requests"):
        assert name in used, name
