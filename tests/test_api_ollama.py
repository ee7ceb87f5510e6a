"""Ollama's API through a real `infernode up`, driven by the official `ollama` client."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest

MSGS = [{"role": "user", "content": "Say hello."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def client(node, key: str) -> ollama.Client:
    return ollama.Client(host=node.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_listings(api_node):
    node, _, key = api_node
    c = client(node, key)
    assert httpx.get(node.url + "/api/version", headers={"authorization": f"Bearer {key}"}).json()["version"]
    names = sorted(m.model for m in c.list().models)
    assert names == ["stub-model:latest", "tiny-chat:latest", "tiny-vllm:latest"]  # Ollama's names carry a tag
    loaded = {m.model: m for m in c.ps().models}
    assert set(loaded) == set(names) and loaded["tiny-chat:latest"].context_length == 2048
    shown = c.show("tiny-chat")
    assert shown.details.format == "gguf" and "completion" in shown.capabilities
    with pytest.raises(ollama.ResponseError) as e:
        c.show("nope")
    assert e.value.status_code == 404 and "not found" in e.value.error


def test_chat_and_generate_on_llamacpp_streamed_and_not(api_node):
    node, _, key = api_node
    c = client(node, key)
    opts = {"num_predict": 8, "temperature": 0, "top_k": 1, "seed": 1, "num_ctx": 2048}
    whole = c.chat(model="tiny-chat", messages=MSGS, options=opts, keep_alive="5m")
    assert whole.done and whole.message.role == "assistant" and whole.message.content
    assert whole.prompt_eval_count > 0 and 0 < whole.eval_count <= 8 and whole.done_reason in ("stop", "length")
    parts = list(c.chat(model="tiny-chat:latest", messages=MSGS, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == whole.done_reason
    gen = c.generate(model="tiny-chat", prompt="Once upon a time", options=opts)
    assert gen.done and gen.response and gen.prompt_eval_count > 0
    raw = list(c.generate(model="tiny-chat", prompt="Once upon a time", raw=True, options=opts, stream=True))
    assert raw[-1].done and "".join(p.response for p in raw)
    assert c.generate(model="tiny-chat").done_reason == "load"


def test_default_is_a_stream_of_ndjson(api_node):
    node, _, key = api_node
    r = httpx.post(node.url + "/api/chat", json={"model": "stub-model", "messages": MSGS}, timeout=10,
                   headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) == 33 and lines[-1]["done"] and lines[-1]["eval_count"] == 32 and lines[-1]["prompt_eval_count"] == 7


def test_tool_calls_through_stand_in(api_node):
    node, stub, key = api_node
    c = client(node, key)
    for stream in (False, True):
        got = c.chat(model="stub-model", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                     stream=stream)
        parts = list(got) if stream else [got]
        [call] = [tc for p in parts for tc in (p.message.tool_calls or ())]
        assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    answer = c.chat(model="stub-model", tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
    assert answer.message.content.startswith("tok")
    seen = httpx.get(stub + "/stub/events", timeout=5).json()[-1]["body"]
    assert seen["messages"][-1]["role"] == "tool" and \
        seen["messages"][-1]["tool_call_id"] == seen["messages"][-2]["tool_calls"][0]["id"]


def test_embed(api_node):
    node, _, key = api_node
    got = client(node, key).embed(model="stub-model", input=["a", "b"])
    assert len(got.embeddings) == 2 and got.prompt_eval_count == 2


def test_errors_in_ollama_shape(api_node):
    node, _, key = api_node
    with pytest.raises(ollama.ResponseError) as e:
        client(node, "sk-wrong").chat(model="tiny-chat", messages=MSGS)
    assert e.value.status_code == 401 and "API key" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client(node, key).chat(model="nope", messages=MSGS)
    assert e.value.status_code == 404 and "nope" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client(node, key).chat(model="tiny-chat", messages=MSGS, options={"num_predict": 3000})
    assert e.value.status_code == 400 and "context" in e.value.error
    limited = client(node, node.create_key(rpm=1))
    limited.chat(model="stub-model", messages=MSGS)
    with pytest.raises(ollama.ResponseError) as e:
        limited.chat(model="stub-model", messages=MSGS)
    assert e.value.status_code == 429


@pytest.mark.parametrize("path,body", [
    ("/api/chat", b"{"), ("/api/chat", b'{"model": "stub-model", "messages": 3}'),
    ("/api/generate", b'{"model": "stub-model", "prompt": {"a": 1}}'),
    ("/api/embed", b'{"model": "stub-model", "input": [null]}'),
    ("/api/show", b'{"model": 7}'),
    ("/api/chat", b'{"model": "stub-model", "messages": [' + b'{"role": "user", "content": "x"},' * 50000 + b"1]}"),
])
def test_hostile_input_is_4xx_in_ollama_shape(api_node, path, body):
    node, _, key = api_node
    r = httpx.post(node.url + path, content=body, timeout=30, headers={"authorization": f"Bearer {key}"})
    assert 400 <= r.status_code < 500 and isinstance(r.json()["error"], str)


def test_wrong_method(api_node):
    node, _, key = api_node
    r = httpx.post(node.url + "/api/tags", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 400 and "GET" in r.json()["error"]


def test_embeddings_on_a_model_that_cannot_embed_is_400(api_node):
    node, _, key = api_node
    with pytest.raises(ollama.ResponseError) as e:
        client(node, key).embed(model="tiny-chat", input="x")
    assert e.value.status_code == 400 and "--embedding" in e.value.error
    c = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as oe:
        c.embeddings.create(model="tiny-chat", input="x")
    assert oe.value.body["code"] == "unsupported_endpoint" and "cannot serve embeddings" in oe.value.body["message"]
