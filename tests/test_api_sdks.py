"""What real applications do, through the official openai, anthropic and ollama SDKs against a real node.

Agent loops that send a tool call's result back (an assistant turn holding only the call,
then the result) on every API, streamed and not; structured output; `models.retrieve`;
error classes and retry behaviour; request ids. `tiny-chat` runs on the default llama.cpp
runtime, whatever it is (each runtime's dialect is in its adapter, and the node maps to
it); `tiny-lcs` is llama.cpp's own `llama-server` started by hand on the same model (the
binary the suite uses, tests/conftest.py `llama_server()`), fronted as an `external`
model: the same server with its own flags, behind the runtime-agnostic path.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from pydantic import BaseModel

from runtimes import OPENAI, llamacpp
from tests.conftest import REPO, TINY_MODEL, NodeProc, free_port, llama_server, start_node, write_config

TINY_GGUF = REPO / "node" / "builtin_models" / "tiny-chat" / "tiny-chat.gguf"
ODD_NAME = "org.stub:v1"   # model names may hold `.` and `:` (never `/`: a name becomes a path in the store)


MODELS = ["tiny-chat", "tiny-lcs"]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
LOOP = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
SAMPLING = {"temperature": 0, "seed": 1}


class Verdict(BaseModel):
    ok: bool


VERDICT_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not up in {timeout}s")


@pytest.fixture(scope="module")
def sdk_node(tmp_path_factory) -> Iterator[tuple[NodeProc, str]]:
    """tiny-chat (the llamacpp runtime), ODD_NAME (the stand-in worker) and tiny-lcs (llama-server by hand)."""
    from tests.fakes import openai_worker

    d: Path = tmp_path_factory.mktemp("sdks")
    stub_port = free_port()
    stub = openai_worker.start(stub_port, "--model", ODD_NAME)
    procs: list[subprocess.Popen] = [stub]
    models = TINY_MODEL + f"""
[[models]]
name = "{ODD_NAME}"
runtime = "external"
url = "http://127.0.0.1:{stub_port}/v1"
max_model_len = 4096
"""
    port = free_port()
    log = (d / "llama-server.log").open("wb")
    lcs = subprocess.Popen([str(llama_server()), "-m", str(TINY_GGUF), "--alias", "tiny-lcs", "--host", "127.0.0.1",
                            "--port", str(port), "-np", "2", "-t", "1", "--jinja", "-c", "4096"],
                           stdout=log, stderr=subprocess.STDOUT)
    procs.append(lcs)
    _wait_http(f"http://127.0.0.1:{port}/health", lcs)
    models += f"""
[[models]]
name = "tiny-lcs"
runtime = "external"
url = "http://127.0.0.1:{port}/v1"
max_model_len = 4096
"""
    node = start_node(write_config(d, models))
    try:
        node.wait_ready(timeout=180)
        yield node, node.create_key()
    finally:
        node.stop()
        for p in procs:
            p.terminate()
            p.wait(10)


def oai(node: NodeProc, key: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=key, **{"max_retries": 0, **kw})


def ant(node: NodeProc, key: str, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.url, api_key=key, **{"max_retries": 0, **kw})


def oll(node: NodeProc, key: str) -> ollama.Client:
    return ollama.Client(host=node.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


# -- agent loops: a tool call's result sent back, on every API ---------------------------
@pytest.mark.parametrize("model", MODELS)
def test_openai_chat_tool_result_round_trip(sdk_node, model):
    node, key = sdk_node
    c = oai(node, key)
    whole = c.chat.completions.create(model=model, messages=LOOP, tools=[TOOL], max_tokens=8, **SAMPLING)
    assert whole.choices[0].finish_reason in ("stop", "length", "tool_calls") and whole.usage.completion_tokens > 0
    assert whole._request_id
    stream = c.chat.completions.create(model=model, messages=LOOP, tools=[TOOL], max_tokens=8, stream=True,
                                       stream_options={"include_usage": True}, **SAMPLING)
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_responses_function_call_output_round_trip(sdk_node, model):
    node, key = sdk_node
    c = oai(node, key)
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}]
    tools = [{"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}]
    r = c.responses.create(model=model, input=items, tools=tools, max_output_tokens=8, temperature=0)
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens > 0
    events = list(c.responses.create(model=model, input=items, tools=tools, max_output_tokens=8, temperature=0,
                                     stream=True))
    # A stream cut by max_output_tokens ends with response.incomplete, as OpenAI's does (not .completed).
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.usage.output_tokens == r.usage.output_tokens


@pytest.mark.parametrize("model", MODELS)
def test_anthropic_tool_result_round_trip(sdk_node, model):
    node, key = sdk_node
    c = ant(node, key)
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": "sunny, 21 C"}]}]
    tools = [{"name": "get_weather", "input_schema": TOOL["function"]["parameters"]}]
    msg = c.messages.create(model=model, max_tokens=8, messages=messages, tools=tools, extra_body={"temperature": 0})
    assert msg.stop_reason in ("end_turn", "max_tokens", "tool_use") and msg.usage.output_tokens > 0
    assert msg._request_id  # the anthropic SDK reads `request-id`
    with c.messages.stream(model=model, max_tokens=8, messages=messages, tools=tools,
                           extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    assert final.usage.output_tokens == msg.usage.output_tokens


@pytest.mark.parametrize("model", MODELS)
def test_ollama_tool_result_round_trip(sdk_node, model):
    node, key = sdk_node
    c = oll(node, key)
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}]
    opts = {"num_predict": 8, "temperature": 0, "seed": 1}
    whole = c.chat(model=model, messages=messages, tools=[TOOL], options=opts)
    assert whole.done and whole.eval_count > 0
    parts = list(c.chat(model=model, messages=messages, tools=[TOOL], options=opts, stream=True))
    assert parts[-1].done and parts[-1].eval_count == whole.eval_count


# -- what a client asks for is honoured or refused --------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_max_completion_tokens_is_honoured(sdk_node, model):
    node, key = sdk_node
    r = oai(node, key).chat.completions.create(model=model, messages=LOOP[:1], max_completion_tokens=12, **SAMPLING)
    assert 0 < r.usage.completion_tokens <= 12   # llama-cpp-python alone ignores it and fills the context


def test_n_is_honoured_or_refused_naming_the_field(sdk_node):
    node, key = sdk_node
    c = oai(node, key)
    # What the default llama.cpp runtime's adapter declares: one choice only (a 400 naming n), or n honoured.
    if getattr(llamacpp, "DIALECT", OPENAI).ignores.get("n") == 1:
        with pytest.raises(openai.BadRequestError) as caught:
            c.chat.completions.create(model="tiny-chat", messages=LOOP[:1], max_tokens=4, n=2)
        assert caught.value.body["param"] == "n" and "'n'" in caught.value.body["message"]
        assert caught.value.response.headers["x-should-retry"] == "false"
    else:
        r = c.chat.completions.create(model="tiny-chat", messages=LOOP[:1], max_tokens=4, n=2)
        assert len(r.choices) == 2


# -- structured output ------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_openai_parse_with_a_pydantic_model(sdk_node, model):
    node, key = sdk_node
    c = oai(node, key)
    r = c.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                 response_format=Verdict, max_tokens=64, **SAMPLING)
    assert isinstance(r.choices[0].message.parsed, Verdict)


@pytest.mark.parametrize("model", MODELS)
def test_responses_text_format_json_schema(sdk_node, model):
    node, key = sdk_node
    r = oai(node, key).responses.create(
        model=model, input="Is the sky blue?", max_output_tokens=64, temperature=0,
        text={"format": {"type": "json_schema", "name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}})
    assert isinstance(json.loads(r.output_text)["ok"], bool)


@pytest.mark.parametrize("model", MODELS)
def test_ollama_format_schema(sdk_node, model):
    node, key = sdk_node
    r = oll(node, key).chat(model=model, messages=[{"role": "user", "content": "Is the sky blue?"}],
                            format=Verdict.model_json_schema(), options={"num_predict": 64, "temperature": 0})
    assert Verdict.model_validate_json(r.message.content)


# -- models.retrieve ---------------------------------------------------------------------------
def test_models_retrieve_openai_and_anthropic(sdk_node):
    node, key = sdk_node
    m = oai(node, key).models.retrieve("tiny-chat")
    assert (m.id, m.object, m.owned_by) == ("tiny-chat", "model", "infernode") and m.created > 0
    assert oai(node, key).models.retrieve(ODD_NAME).id == ODD_NAME
    with pytest.raises(openai.NotFoundError):   # an id with a `/` is looked up like any other (and is no name here)
        oai(node, key).models.retrieve("org/stub:v1")
    with pytest.raises(openai.NotFoundError) as caught:
        oai(node, key).models.retrieve("nope")
    assert caught.value.body["code"] == "model_not_found"
    a = ant(node, key).models.retrieve("tiny-chat")
    assert (a.type, a.id, a.display_name) == ("model", "tiny-chat", "tiny-chat") and a.created_at.year >= 2024
    assert ant(node, key).models.retrieve(ODD_NAME).id == ODD_NAME
    listed = [m.id for m in ant(node, key).models.list()]
    assert "tiny-chat" in listed and ODD_NAME in listed
    with pytest.raises(anthropic.NotFoundError) as nf:
        ant(node, key).models.retrieve("nope")
    assert nf.value.body["error"]["type"] == "not_found_error"
    # A model the key may not use is as unknown as a missing one.
    limited = node.create_key(models=[ODD_NAME])
    with pytest.raises(openai.NotFoundError):
        oai(node, limited).models.retrieve("tiny-chat")


def test_model_card_bad_ids(sdk_node):
    node, key = sdk_node
    auth = {"authorization": f"Bearer {key}"}
    for path in ("/v1/models/%FF%FE", "/v1/models/" + "a" * 5000, "/v1/models/%ED%A0%80", "/v1/models/"):
        r = httpx.get(node.url + path, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", path
        assert r.headers["x-should-retry"] == "false" and r.headers["request-id"] == r.headers["x-request-id"]
    r = httpx.get(node.url + "/v1/models", headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                  params={"limit": "x"})
    assert r.status_code == 400 and r.json()["type"] == "error"


# -- errors as real servers give them ------------------------------------------------------------
def test_budget_refusal_is_not_retried(sdk_node):
    node, _ = sdk_node
    key = node.create_key(budget_tokens=1)
    oai(node, key).chat.completions.create(model=ODD_NAME, messages=LOOP[:1], max_tokens=2)  # spends the budget
    started = time.monotonic()
    with pytest.raises(anthropic.RateLimitError) as caught:
        anthropic.Anthropic(base_url=node.url, api_key=key).messages.create(   # default retries
            model=ODD_NAME, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 5      # the SDK does not sleep until the budget's reset
    headers = caught.value.response.headers
    assert headers["x-should-retry"] == "false" and int(headers["retry-after"]) <= 60
    assert int(headers["x-ratelimit-reset-budget"].rstrip("s")) > 0 and headers["request-id"]
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=node.url + "/v1", api_key=key).chat.completions.create(
            model=ODD_NAME, messages=LOOP[:1], max_tokens=2)
    assert time.monotonic() - started < 10


def test_bad_request_is_not_retried(sdk_node):
    node, key = sdk_node
    sent = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    c = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=3, http_client=http)
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model="tiny-chat", messages=LOOP[:1], extra_body={"stream_options": "x"})
    assert len(sent) == 1 and caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.request_id == caught.value.response.headers["request-id"]


def test_request_id_on_every_api_and_node_answered_route(sdk_node):
    node, key = sdk_node
    auth = {"authorization": f"Bearer {key}"}
    for method, path in (("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/v1/models"), ("GET", "/api/tags"),
                         ("GET", "/v1/nope"), ("POST", "/api/pull"), ("GET", "/v1/me")):
        r = httpx.request(method, node.url + path, headers=auth, json={"model": "x"} if method == "POST" else None)
        assert r.headers["request-id"] == r.headers["x-request-id"], path
    r = httpx.post(node.url + "/v1/chat/completions", content=b"{", headers={**auth, "x-request-id": "abc"})
    assert r.status_code == 400 and r.headers["request-id"] == "abc" and r.headers["x-should-retry"] == "false"


# -- Ollama's own routes, answered by the node ---------------------------------------------------
def test_ollama_listings_and_model_management(sdk_node):
    node, key = sdk_node
    c = oll(node, key)
    listed = {m.model: m for m in c.list().models}
    tiny = listed["tiny-chat:latest"]
    assert tiny.size == TINY_GGUF.stat().st_size and len(tiny.digest) == 64
    assert tiny.details.format == "gguf" and tiny.details.family == "llama"
    assert f"{ODD_NAME}" in listed                      # already tagged
    assert c.show("tiny-chat:latest").capabilities == ["completion"]   # its template renders no tools
    for call in (lambda: c.pull("tiny-chat"), lambda: c.delete("tiny-chat"), lambda: c.copy("tiny-chat", "x"),
                 lambda: c.push("tiny-chat")):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 403 and "appliance.toml" in caught.value.error
    # Open WebUI with the node as both connections: the OpenAI list and the Ollama list name models apart.
    assert {m.id for m in oai(node, key).models.list()}.isdisjoint(set(listed) - {ODD_NAME})
