"""The /v1 routes fuzzed with hypothesis against a real node (a stand-in worker behind it):
bad input of any shape is a 4xx in OpenAI's error shape, never a 5xx.

Bodies are JSON objects whose known fields (model, messages, prompt, stream,
stream_options, max_tokens, user, ...) take values of any JSON type, including
integers past 64 bits, lone surrogates and nesting; plus bodies that are not objects
and bytes that are not JSON. A fixed budget of examples, no deadline (a loaded box).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port, start_node, write_config
from tests.fakes import openai_worker

MODEL = "fuzz-model"
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/score"]
FIELDS = ["model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens", "max_completion_tokens",
          "user", "n", "temperature", "tools", "documents", "query"]
SETTINGS = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
    st.sampled_from(["\ud800", "\udfff", "a\x00b", MODEL, ""]), st.integers(4000, 6000).map(lambda n: "x" * n))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["role", "content", "text", "type", "include_usage",
                                                                  "x"]), inner, max_size=4)), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 5]),
                                           "content": json_values}), max_size=3)
bodies = st.fixed_dictionaries({}, optional={
    **{f: json_values for f in FIELDS},
    "model": st.sampled_from([MODEL, MODEL, MODEL, "other", 5, None]),
    "messages": st.one_of(messages, json_values),
    "stream": st.sampled_from([True, False, 1, "yes"]),
    "stream_options": st.one_of(st.none(), st.just({"include_usage": True}), json_values)})


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory):
    d: Path = tmp_path_factory.mktemp("fuzzv1")
    port = free_port()
    stub = openai_worker.start(port, "--model", MODEL, "--chunks", "3", "--no-record")
    node = start_node(write_config(d, f"""
[[models]]
name = "{MODEL}"
runtime = "external"
url = "http://127.0.0.1:{port}/v1"
max_model_len = 4096
"""))
    try:
        node.wait_ready()
        yield node, node.create_key()
    finally:
        node.stop()
        stub.kill()
        stub.wait()


def check_answer(r: httpx.Response, sent: bytes) -> None:
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (r.status_code, r.text[:300], sent[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), r.text
        assert set(err) >= {"message", "type", "param", "code"}, r.text


def post(node, key: str, route: str, content: bytes) -> httpx.Response:
    return httpx.post(node.url + route, content=content, timeout=30,
                      headers={"authorization": f"Bearer {key}", "content-type": "application/json"})


def test_known_attacks_are_4xx(fuzz_node):
    node, key = fuzz_node
    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [
        b'{"model": "fuzz-model", "messages": ' + deep + b"}",
        b'{"model": "fuzz-model", "messages": 5}',
        b'{"model": "fuzz-model", "messages": [], "stream": true, "stream_options": 5}',
        b'{"model": "fuzz-model", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "fuzz-model", "prompt": "\\ud800\\udfff\\ud800", "max_tokens": 1}',
        b'{"model": "\\ud800"}', b"5", b"null", b'"str"', b"[]", b"", b"\xff\xfe", b'{"model": ' + b"9" * 5000 + b"}",
        b'{"model": "fuzz-model", "messages": [], "max_tokens": 1' + b"0" * 30 + b"}",
        b'{"model": "fuzz-model", "messages": [' + b'{"content": [' * 300 + b"]}" * 300 + b"]}",
    ]
    for route in ROUTES:
        for content in cases:
            r = post(node, key, route, content)
            check_answer(r, content)
    # The very ones the issue saw as 500s are the node's own 400s.
    for content in cases[:3]:
        r = post(node, key, "/v1/chat/completions", content)
        assert r.status_code == 400 and r.json()["error"]["source"] == "node", r.text


@given(route=st.sampled_from(ROUTES), body=st.one_of(bodies, json_values))
@SETTINGS
def test_fuzzed_bodies_are_never_5xx(fuzz_node, route, body):
    node, key = fuzz_node
    content = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as a valid "\ud800" escape
    check_answer(post(node, key, route, content), content)


@given(route=st.sampled_from(ROUTES), content=st.binary(max_size=200))
@settings(max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_fuzzed_bytes_are_never_5xx(fuzz_node, route, content):
    node, key = fuzz_node
    check_answer(post(node, key, route, content), content)
