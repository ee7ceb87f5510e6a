"""OpenAI's Responses API through a real `infernode up`, driven by the official `openai` client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def client(node, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)


def test_translated_on_llamacpp_streamed_and_not(api_node):
    node, _, key = api_node
    c = client(node, key)
    args = dict(model="tiny-chat", instructions="You are terse.", input="Say hello.", max_output_tokens=8,
                temperature=0, extra_body={"top_k": 1}, store=False)
    whole = c.responses.create(**args)
    assert whole.object == "response" and whole.output_text and whole.status in ("completed", "incomplete")
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 8
    events = list(c.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == f"response.{whole.status}" and [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_function_calls_through_stand_in(api_node):
    node, stub, key = api_node
    c = client(node, key)
    r = c.responses.create(model="stub-model", input="Weather in Paris?", tools=[WEATHER])
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.arguments == '{"city": "Paris"}' and call.call_id == "call_stub_1"
    with c.responses.stream(model="stub-model", input="Weather in Paris?", tools=[WEATHER]) as s:
        final = s.get_final_response()
    [streamed] = [o for o in final.output if o.type == "function_call"]
    assert streamed.arguments == call.arguments and final.usage.output_tokens == 5
    r = c.responses.create(model="stub-model", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert r.output_text.startswith("tok")
    seen = httpx.get(stub + "/stub/events", timeout=5).json()[-1]["body"]
    assert seen["messages"][-1] == {"role": "tool", "tool_call_id": "call_stub_1", "content": "sunny"}


def test_passed_through_to_a_runtime_that_serves_it(api_node):
    node, _, key = api_node
    c = client(node, key)
    # vLLM (its stand-in here) keeps responses itself: previous_response_id reaches it untranslated.
    r = c.responses.create(model="tiny-vllm", input="hi", max_output_tokens=3, previous_response_id="resp_earlier")
    assert r.id == "resp_fake" and r.previous_response_id == "resp_earlier" and r.usage.output_tokens == 3
    events = list(c.responses.create(model="tiny-vllm", input="hi", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.completed"
    deadline = time.monotonic() + 15
    rows: list = []
    while time.monotonic() < deadline:
        with node.admin() as a:
            rows = a.get("/admin/v1/usage", params={"group_by": "api,model"}).json()["data"]
        mine = [x for x in rows if x["api"] == "responses" and x["model"] == "tiny-vllm"]
        if mine and mine[0]["requests"] >= 2:
            assert mine[0]["completion_tokens"] == 6 and mine[0]["prompt_tokens"] == 10  # streamed usage counted
            return
        time.sleep(0.3)
    raise AssertionError(rows)


def test_errors_in_openai_shape(api_node):
    node, _, key = api_node
    with pytest.raises(openai.AuthenticationError):
        client(node, "sk-wrong").responses.create(model="tiny-chat", input="x")
    with pytest.raises(openai.NotFoundError) as e:
        client(node, key).responses.create(model="nope", input="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client(node, key).responses.create(model="tiny-chat", input="x", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id" and "stateless" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(node, key).responses.create(model="tiny-chat", input="x", tools=[{"type": "web_search"}])
    assert "function tools" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(node, key).responses.create(model="tiny-chat", input="x", max_output_tokens=3000)
    assert e.value.body["code"] == "context_length_exceeded"
    limited = client(node, node.create_key(rpm=1))
    limited.responses.create(model="stub-model", input="x")
    with pytest.raises(openai.RateLimitError):
        limited.responses.create(model="stub-model", input="x")


@pytest.mark.parametrize("body", [
    b"{", b'"x"', b'{"model": "stub-model", "input": {"a": 1}}',
    b'{"model": "stub-model", "input": [' + b'{"role": "user", "content": [{"type": "input_text", "text": 5}]}' + b"]}",
    b'{"model": "stub-model", "input": "' + b"abcdefghij" * (300 << 10) + b'", "max_output_tokens": 16}',
])
def test_hostile_input_is_4xx_in_openai_shape(api_node, body):
    node, _, key = api_node
    r = httpx.post(node.url + "/v1/responses", content=body, timeout=30, headers={"authorization": f"Bearer {key}"})
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
