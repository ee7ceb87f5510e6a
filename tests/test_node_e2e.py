"""The walking skeleton end to end: a real `infernode up` serving a real llama.cpp worker."""

from __future__ import annotations

import json
import os
import signal

import httpx
import openai
import pytest

from tests.conftest import descendants_of_keepers, wait_until


def client(node, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)


def test_chat_stream_models_and_errors(tiny_node):
    key = tiny_node.create_key()
    c = client(tiny_node, key)

    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    assert models.data[0].model_extra["max_model_len"] == 2048

    chat = c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens == 8 and chat.usage.prompt_tokens > 0

    with httpx.stream("POST", tiny_node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
                            "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3
    bodies = [json.loads(e.removeprefix("data:")) for e in events[:-1]]
    assert all(b["choices"] for b in bodies) and not any(b.get("usage") for b in bodies)  # not asked for: not sent

    chunks = list(c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 2
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    comp = c.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=5)
    assert comp.choices[0].text

    with pytest.raises(openai.AuthenticationError) as e:
        client(tiny_node, "sk-wrong").models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    r = httpx.post(tiny_node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                   content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-request-id"]
    r = httpx.post(tiny_node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                   json={"messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.get(tiny_node.url + "/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_worker_killed_is_restarted(tiny_node):
    key = tiny_node.create_key()
    [w] = tiny_node.workers()
    assert w["state"] == "ready"
    os.kill(w["pid"], signal.SIGKILL)
    # The router stops sending traffic at once; the supervisor restarts it.
    assert wait_until(lambda: tiny_node.workers()[0]["restarts"] == 1, timeout=20)
    tiny_node.wait_ready(60)
    [w2] = tiny_node.workers()
    assert w2["pid"] != w["pid"] and w2["state"] == "ready"
    chat = client(tiny_node, key).chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert chat.choices[0].message.content


def test_sigterm_leaves_no_process(node_factory):
    node = node_factory()
    [w] = node.workers()
    assert descendants_of_keepers(node.data_dir)
    rc = node.stop(signal.SIGTERM)
    assert rc == 0, node.log.read_text()[-2000:]
    assert descendants_of_keepers(node.data_dir) == []
    with pytest.raises(ProcessLookupError):
        os.kill(w["pid"], 0)


def test_sigkill_of_node_leaves_no_worker(node_factory):
    node = node_factory()
    [w] = node.workers()
    node.proc.kill()
    node.proc.wait()
    # The keeper waits adopt_grace_s (3 s here) for a successor, then stops the worker.
    assert wait_until(lambda: descendants_of_keepers(node.data_dir) == [], timeout=30), descendants_of_keepers(node.data_dir)
    with pytest.raises(ProcessLookupError):
        os.kill(w["pid"], 0)


def test_readyz_reports_until_ready(node_factory):
    node = node_factory(ready=False)
    r = wait_until(lambda: _get(node.url + "/readyz"), timeout=20)
    assert r.status_code in (200, 503)
    if r.status_code == 503:
        assert r.json()["reasons"]
    node.wait_ready()
    assert httpx.get(node.url + "/healthz").json() == {"status": "ok"}


def _get(url):
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
