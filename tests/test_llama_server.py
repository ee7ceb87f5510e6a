"""The llamacpp runtime is llama.cpp's own llama-server: what it does that the old runtime did not, through a real node.

One real node on the tiny model (the real llama-server, parallel slots, --jinja, --metrics):
a tool-call turn with `content: null` and its result, `max_completion_tokens`, a grammar-
enforced `json_schema`, `n`, requests decoding in parallel, and its `/metrics` under the node's.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading

import httpx
import openai

from tests.conftest import wait_until

SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
          "required": ["colour"], "additionalProperties": False}


def test_what_llama_server_serves_through_the_node(tiny_node) -> None:
    key = tiny_node.create_key()
    c = openai.OpenAI(base_url=tiny_node.url + "/v1", api_key=key, max_retries=0)

    # An agent's second turn: the assistant only called a tool (content null), then the tool answered.
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    turn = c.chat.completions.create(model="tiny-chat", max_tokens=8, tools=tools, messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    assert turn.choices[0].finish_reason in ("stop", "length", "tool_calls") and turn.usage.prompt_tokens > 20

    # max_completion_tokens is honoured (ignore_eos: a random-weight model may end early otherwise).
    short = c.chat.completions.create(model="tiny-chat", max_completion_tokens=12, extra_body={"ignore_eos": True},
                                      messages=[{"role": "user", "content": "Count to a hundred."}])
    assert short.usage.completion_tokens == 12 and short.choices[0].finish_reason == "length"

    # json_schema: a grammar makes even random weights answer an object of the schema.
    shaped = c.chat.completions.create(model="tiny-chat", max_tokens=200, temperature=1.0, messages=[
        {"role": "user", "content": "Pick a colour."}],
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}})
    assert json.loads(shaped.choices[0].message.content) in ({"colour": "red"}, {"colour": "green"}, {"colour": "blue"})

    # n: several choices in one answer.
    two = c.chat.completions.create(model="tiny-chat", n=2, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert [ch.index for ch in two.choices] == [0, 1]

    # Four requests at once, each in a slot of its own, all answered in full.
    def long_answer(out: list[int]) -> None:
        r = httpx.post(tiny_node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=120,
                       json={"model": "tiny-chat", "max_tokens": 200, "ignore_eos": True,
                             "messages": [{"role": "user", "content": "Tell a story."}]})
        out.append(r.json()["usage"]["completion_tokens"] if r.status_code == 200 else r.status_code)
    got: list[int] = []
    threads = [threading.Thread(target=long_answer, args=(got,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [200] * 4

    # The node re-exports the worker's own metrics (scraped every 10 s) with model and replica labels.
    def worker_families() -> str | None:
        body = httpx.get(tiny_node.url + "/metrics", timeout=10).text
        return body if "llamacpp:tokens_predicted_total" in body else None
    text = wait_until(worker_families, timeout=30)
    assert text, "llama-server's own families appear under the node's /metrics"
    assert re.search(r'^llamacpp:tokens_predicted_total\{[^}]*model="tiny-chat"[^}]*replica="0"[^}]*\} \d', text, re.M) \
        or re.search(r'^llamacpp:tokens_predicted_total\{[^}]*replica="0"[^}]*model="tiny-chat"[^}]*\} \d', text, re.M)
    assert not any(line.startswith("llamacpp:") and "model=" not in line for line in text.splitlines())


def test_streams_one_after_another_on_kept_connections_all_answer(tiny_node) -> None:
    """llama-server closes its side after each stream (though it says keep-alive): the node must not reuse it.

    Reusing such a connection failed about one stream in six at 8 clients with a 502
    ("the worker's connection ended after the request was sent").
    """
    key = tiny_node.create_key()
    c = httpx.Client(base_url=tiny_node.url, headers={"authorization": f"Bearer {key}"}, timeout=60)

    def one(i: int) -> tuple[int, bool]:
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "tiny-chat", "max_tokens": 8, "stream": True,
                "messages": [{"role": "user", "content": f"stream {i}"}]}) as r:
            return r.status_code, r.read().rstrip().endswith(b"data: [DONE]")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    assert results == [(200, True)] * 200
