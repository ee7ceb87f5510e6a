"""One tenant cannot hurt the others through a body: issue 22's request-path attacks, replayed against a real node.

The node (tests/conftest.py's `api_node`: the real llama.cpp worker on the tiny model,
and the stand-in worker as an external model) is attacked from this process while a
bystander asks `/healthz` from its own (tests/test_frontdoor.py's Watch). Each attack
must be refused or served with: node CPU ≤ 0.5 s per request, RSS growth ≤ 64 MiB,
the bystander's worst latency ≤ 300 ms above its worst with no attack (the machine is
shared), no 5xx; and every refusal is a 400 in the
attacked API's own error shape, naming the field.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.test_frontdoor import Watch

CPU_PER_REQUEST_S, RSS_MB, WORST_S = 0.5, 64, 0.3
TINY = "tiny-chat"
REPEAT = 3


def _post(node, key: str, path: str, body: Any, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(node.url + path, content=content, timeout=120, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})})


def _attack(node, key: str, path: str, body: Any, what: str, n: int = REPEAT) -> list[httpx.Response]:
    # The machine is shared: the bystander's worst latency with no attack, just before, is the machine's own
    # scheduling noise; the attack may add at most WORST_S to it.
    with Watch(node) as calm:
        pass
    with Watch(node) as w:
        answers = [_post(node, key, path, body) for _ in range(n)]
    worst, noise = max(w.latencies), max(calm.latencies)
    report = (f"{what}: {len(body) if isinstance(body, bytes) else len(json.dumps(body))} B x {n}: node CPU "
              f"{w.cpu / n:.3f} s/request, RSS +{w.rss:.1f} MiB, bystander worst {worst * 1000:.0f} ms "
              f"(p99 {w.p99 * 1000:.0f} ms; {noise * 1000:.0f} ms with no attack) over {len(w.latencies)} requests, "
              f"statuses {sorted({r.status_code for r in answers})}")
    print(report)
    assert all(r.status_code < 500 for r in answers), report
    assert w.cpu / n <= CPU_PER_REQUEST_S and w.rss <= RSS_MB and worst <= WORST_S + noise, report
    return answers


def _openai_400(r: httpx.Response, param: str) -> None:
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error", r.text


def _anthropic_400(r: httpx.Response) -> str:
    body = r.json()
    assert r.status_code == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error", r.text
    return body["error"]["message"]


def _ollama_400(r: httpx.Response) -> str:
    body = r.json()
    assert r.status_code == 400 and list(body) == ["error"] and isinstance(body["error"], str), r.text
    return body["error"]


def test_ollama_tool_results_that_match_no_call(api_node):
    """Issue 22: N = 16,000 (656 KiB) blocked the loop 5 s; now linear, off the loop, and refused by the context."""
    node, _, key = api_node
    n = 16000
    body = {"model": TINY, "stream": False, "messages": [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": f"f{i}", "arguments": {}}}
                                                            for i in range(n)]},
        *[{"role": "tool", "tool_name": "none", "content": "r"} for _ in range(n)]]}
    for r in _attack(node, key, "/api/chat", body, "ollama tool results"):
        assert "context" in _ollama_400(r)


@pytest.mark.parametrize("path,body,param,shape", [
    ("/v1/chat/completions", {"user": "\ud800"}, "user", "openai"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfffb"}]}, "messages.0.content", "openai"),
    ("/v1/chat/completions", {"metadata": {"\udc00": "x"}}, "metadata.\\udc00", "openai"),
    ("/v1/responses", {"input": "hi", "safety_identifier": "\ud83d"}, "safety_identifier", "openai"),
    ("/v1/messages", {"metadata": {"user_id": "\ud800"}}, "metadata.user_id", "anthropic"),
    ("/api/chat", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content", "ollama"),
], ids=["user", "content", "metadata-key", "responses", "anthropic-user-id", "ollama-content"])
def test_a_lone_surrogate_anywhere_is_a_400_in_the_apis_shape(api_node, path, body, param, shape):
    node, _, key = api_node
    full = {"model": TINY, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **body}
    r = _post(node, key, path, json.dumps(full).encode())  # ensure_ascii: the surrogate is a \\u escape
    if shape == "openai":
        _openai_400(r, param)
    elif shape == "anthropic":
        assert param in _anthropic_400(r)
    else:
        assert param in _ollama_400(r)
    assert "\\ud8" in r.text.lower() or "\\udc" in r.text.lower() or "surrogate" in r.text


def test_huge_user_and_metadata_are_refused_cheaply(api_node):
    node, _, key = api_node
    chat = {"model": TINY, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    for r in _attack(node, key, "/v1/chat/completions", {**chat, "user": "u" * (3 << 20)}, "3 MiB user"):
        _openai_400(r, "user")
    for r in _attack(node, key, "/v1/chat/completions", {**chat, "metadata": {f"k{i}": "v" for i in range(50000)}},
                     "50,000 metadata pairs"):
        _openai_400(r, "metadata")
    r = _post(node, key, "/v1/chat/completions", {**chat, "user": "a\nforged log line"})
    _openai_400(r, "user")
    r = _post(node, key, "/v1/messages", {**chat, "metadata": {"user_id": "x" * 257}})
    assert "metadata.user_id" in _anthropic_400(r)


@pytest.mark.parametrize("raw,param", [
    (b'"temperature": "hot"', "temperature"), (b'"temperature": Infinity', None), (b'"temperature": NaN', None),
    (b'"temperature": 1e400', None), (b'"top_p": 1.5', "top_p"), (b'"max_tokens": -1', "max_tokens"),
    (b'"max_completion_tokens": 0', "max_completion_tokens"), (b'"n": 1000', "n"),
    (b'"stop": ' + json.dumps(["x"] * 30).encode(), "stop"), (b'"stop": [1]', "stop"), (b'"seed": "x"', "seed"),
    (b'"presence_penalty": -3', "presence_penalty"), (b'"top_logprobs": 50', "top_logprobs"),
    (b'"logprobs": "yes"', "logprobs"), (b'"stream": "yes"', "stream"),
], ids=lambda v: v.decode()[:24] if isinstance(v, bytes) else str(v))
def test_sampling_fields_the_worker_would_refuse_are_400_before_it(api_node, raw, param):
    node, _, key = api_node
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], %s}' % (TINY.encode(), raw)
    r = _post(node, key, "/v1/chat/completions", body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["source"] == "node" and err["param"] == param, r.text


def test_translated_sampling_fields_name_the_clients_field(api_node):
    node, _, key = api_node
    r = _post(node, key, "/v1/messages", b'{"model": "tiny-chat", "max_tokens": 5, "temperature": 1e400, '
                                         b'"messages": [{"role": "user", "content": "hi"}]}')
    assert "not valid JSON" in _anthropic_400(r)
    r = _post(node, key, "/v1/messages", {"model": TINY, "max_tokens": 5, "temperature": 1.5,
                                          "messages": [{"role": "user", "content": "hi"}]})
    assert "temperature" in _anthropic_400(r)
    r = _post(node, key, "/api/chat", {"model": TINY, "options": {"num_predict": 0, "seed": 2 ** 70},
                                       "messages": [{"role": "user", "content": "hi"}]})
    assert "options.num_predict" in _ollama_400(r) or "options.seed" in _ollama_400(r)
    r = _post(node, key, "/v1/responses", {"model": TINY, "input": "hi", "max_output_tokens": 0})
    _openai_400(r, "max_output_tokens")


def test_many_empty_messages_are_refused_before_the_worker(api_node):
    """Issue 22: count_tokens with 32,000 empty messages took 19 s of the worker; each message costs template tokens."""
    node, _, key = api_node
    messages = [{"role": "user", "content": ""}] * 32000
    for r in _attack(node, key, "/v1/messages/count_tokens", {"model": TINY, "messages": messages},
                     "count_tokens, 32,000 empty messages"):
        assert "context" in _anthropic_400(r)
    for r in _attack(node, key, "/v1/chat/completions", {"model": TINY, "messages": messages},
                     "chat, 32,000 empty messages"):
        _openai_400(r, "messages")
    # A chat that fits is still served by the real worker.
    r = _post(node, key, "/v1/chat/completions", {"model": TINY, "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}] * 3})
    assert r.status_code == 200, r.text


def test_large_bodies_are_read_off_the_loop(api_node):
    """3.5 MiB of translation work per request (Anthropic tool turns) while the bystander keeps its latency."""
    node, _, key = api_node
    n = 9000
    uses = [{"type": "tool_use", "id": f"t{i}", "name": "f", "input": {"a": "x" * 100}} for i in range(n)]
    results = [{"type": "tool_result", "tool_use_id": f"t{i}", "content": "r" * 100} for i in range(n)]
    body = {"model": TINY, "max_tokens": 5, "messages": [{"role": "assistant", "content": uses},
                                                          {"role": "user", "content": results}]}
    for r in _attack(node, key, "/v1/messages", body, "anthropic, 9,000 tool turns"):
        assert "context" in _anthropic_400(r)


def test_worker_refusals_keep_their_4xx_without_internals(api_node):
    """A worker's 4xx is the client's 4xx; a worker 5xx a 502; neither shows paths or tracebacks."""
    node, _, key = api_node
    leak = ('bad value\n  File "/usr/lib/python3.11/site-packages/llama_cpp/server/app.py", line 485, in create\n'
            "Traceback (most recent call last): secret")
    base = {"model": "stub-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    for status, want in ((422, 422), (400, 400), (500, 502)):
        r = _post(node, key, "/v1/chat/completions", {**base, "stub": {"status": status, "message": leak}})
        assert r.status_code == want and r.json()["error"]["source"] == "worker", r.text
        assert "bad value" in r.text and "/usr" not in r.text and "app.py" not in r.text and "secret" not in r.text
    # The real llama.cpp worker (llama-server) refusing a body the node passes: a grammar it cannot parse.
    r = _post(node, key, "/v1/chat/completions", {**base, "model": TINY, "grammar": "root ::= ((("})
    assert r.status_code == 400 and r.json()["error"]["source"] == "worker", r.text
    assert "grammar" in r.json()["error"]["message"], r.text
    assert 'File "' not in r.text and ".py" not in r.text and "Traceback" not in r.text, r.text


def test_translated_routes_scrub_worker_errors_too():
    from node.gateway import anthropic, ollama
    from node.gateway.bodies import WorkerRefused, worker_message

    raw = json.dumps({"error": {"message": 'bad\n  File "/opt/x/app.py", line 3\nTraceback (most recent call last)',
                                "type": "internal_server_error"}}).encode()
    for route_error, status in ((anthropic.error, 422), (ollama.error, 400), (anthropic.error, 500)):
        got, body = route_error(WorkerRefused(worker_message(raw), status), "rid")
        assert got == (status if status < 500 else 502) and b"bad" in body and b"/opt" not in body
        assert b"app.py" not in body and b"Traceback" not in body


def test_a_client_request_id_with_control_bytes_is_not_adopted(api_node):
    node, _, key = api_node
    body = {"model": "stub-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    r = _post(node, key, "/v1/chat/completions", body, headers={"x-request-id": b"ok-\xe9-id"})
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32 and "ok-" not in r.headers["x-request-id"]
    r = _post(node, key, "/v1/chat/completions", body, headers={"x-request-id": "id-" + "x" * 300})
    assert r.status_code == 200 and r.headers["x-request-id"] == ("id-" + "x" * 300)[:128]
