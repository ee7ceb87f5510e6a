"""Anthropic's Messages API through a real `infernode up`, driven by the official `anthropic` client."""

from __future__ import annotations

import time

import anthropic
import httpx
import pytest

MSGS = [{"role": "user", "content": "Say hello."}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def client(node, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.url, api_key=key, max_retries=0)


def usage_rows(node, api: str) -> list[dict]:
    with node.admin() as c:
        return c.get("/admin/v1/usage", params={"group_by": "api,model"}).json()["data"]


def test_messages_on_llamacpp_streamed_and_not(api_node):
    node, _, key = api_node
    c = client(node, key)
    msg = c.messages.create(model="tiny-chat", max_tokens=8, messages=MSGS, extra_body={"temperature": 0, "top_k": 1},
                            system="You are terse.", stop_sequences=["\n\n\n"])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "tiny-chat"
    assert msg.content and msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 8
    with c.messages.stream(model="tiny-chat", max_tokens=8, messages=MSGS, extra_body={"temperature": 0, "top_k": 1},
                           system="You are terse.", stop_sequences=["\n\n\n"]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == msg.content[0].text and final.content[0].text == text
    assert final.stop_reason == msg.stop_reason
    assert final.usage.output_tokens == msg.usage.output_tokens


def test_raw_event_sequence(api_node):
    node, _, key = api_node
    body = {"model": "stub-model", "max_tokens": 4, "messages": MSGS, "stream": True}
    with httpx.stream("POST", node.url + "/v1/messages", json=body, timeout=10,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kinds = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert kinds[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") == 32


def test_tool_use_round_trip_through_stand_in(api_node):
    node, stub, key = api_node
    c = client(node, key)
    msg = c.messages.create(model="stub-model", max_tokens=32, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"}])
    assert msg.stop_reason == "tool_use"
    [use] = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id == "call_stub_1"
    with c.messages.stream(model="stub-model", max_tokens=32, tools=[WEATHER],
                           messages=[{"role": "user", "content": "Weather in Paris?"}]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Paris"}
    assert final.usage.input_tokens == 7 and final.usage.output_tokens == 5
    # The result goes back as a tool message, and the stand-in answers in text.
    msg = c.messages.create(model="stub-model", max_tokens=32, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    assert msg.stop_reason == "max_tokens" and msg.content[0].type == "text"
    seen = httpx.get(stub + "/stub/events", timeout=5).json()[-1]["body"]
    assert seen["messages"][-2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert seen["messages"][-1] == {"role": "tool", "tool_call_id": "call_stub_1", "content": "sunny"}
    assert seen["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]


def test_count_tokens_matches_messages_usage(api_node):
    node, _, key = api_node
    c = client(node, key)
    counted = c.messages.count_tokens(model="tiny-chat", messages=MSGS, system="You are terse.")
    msg = c.messages.create(model="tiny-chat", max_tokens=2, messages=MSGS, system="You are terse.")
    assert counted.input_tokens == msg.usage.input_tokens > 0


def test_errors_in_anthropic_shape(api_node):
    node, _, key = api_node
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(node, "sk-wrong").messages.create(model="tiny-chat", max_tokens=4, messages=MSGS)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    # Authorization: Bearer works too.
    r = httpx.post(node.url + "/v1/messages", json={"model": "stub-model", "max_tokens": 2, "messages": MSGS},
                   headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200 and r.json()["type"] == "message"
    with pytest.raises(anthropic.NotFoundError) as e:
        client(node, key).messages.create(model="nope", max_tokens=4, messages=MSGS)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:  # context too long, checked by the node
        client(node, key).messages.create(model="tiny-chat", max_tokens=3000, messages=MSGS)
    assert e.value.body["error"]["type"] == "invalid_request_error" and "context" in e.value.body["error"]["message"]
    limited = client(node, node.create_key(rpm=1))
    limited.messages.create(model="stub-model", max_tokens=2, messages=MSGS)
    with pytest.raises(anthropic.RateLimitError) as e:
        limited.messages.create(model="stub-model", max_tokens=2, messages=MSGS)
    assert e.value.body["error"]["type"] == "rate_limit_error" and e.value.response.headers["retry-after"]


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b'{"model": 5}',
    b'{"model": "stub-model", "max_tokens": "many", "messages": []}',
    b'{"model": "stub-model", "max_tokens": 4, "messages": [{"role": "user", "content": {"x": 1}}]}',
    b'{"model": "stub-model", "max_tokens": 4, "messages": [' + b"[" * 100000 + b"]" * 100000 + b"]}",
    b'{"model": "stub-model", "max_tokens": 4, "messages": [{"role": "user", "content": "' + b"a" * (5 << 20) + b'"}]}',
])
def test_hostile_input_is_4xx_in_anthropic_shape(api_node, body):
    node, _, key = api_node
    r = httpx.post(node.url + "/v1/messages", content=body, timeout=30,
                   headers={"x-api-key": key, "content-type": "application/json"})
    assert 400 <= r.status_code < 500
    if r.status_code != 413:  # the server's own body limit answers before any route
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


def test_ledger_records_the_api(api_node):
    node, _, key = api_node
    client(node, key).messages.create(model="stub-model", max_tokens=2, messages=MSGS)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = usage_rows(node, "anthropic")
        if any(r["api"] == "anthropic" and r["model"] == "stub-model" and r["prompt_tokens"] for r in rows):
            return
        time.sleep(0.3)
    raise AssertionError(rows)
