"""Ollama's API <-> OpenAI: the pure translators and listings, table-tested without a server."""

from __future__ import annotations

import json

import pytest

from node.errors import InvalidRequest, ModelNotFound, RateLimited
from node.gateway import ollama
from node.gateway.adapter import Call, ModelView
from node.supply.modelcard import ModelCard

MSG = [{"role": "user", "content": "hi"}]

CHAT = [
    ("defaults: stream true", {"model": "m", "messages": MSG},
     {"model": "m", "stream": True, "messages": MSG}),
    ("options mapped; num_ctx and repeat_penalty accepted, not sent; keep_alive accepted",
     {"model": "m", "messages": MSG, "stream": False, "keep_alive": "5m", "options": {
         "num_predict": 9, "temperature": 0.1, "top_p": 0.5, "top_k": 3, "min_p": 0.05, "seed": 4, "stop": "###",
         "presence_penalty": 0.2, "frequency_penalty": 0.3, "num_ctx": 8192, "repeat_penalty": 1.1}},
     {"model": "m", "stream": False, "messages": MSG, "max_tokens": 9, "temperature": 0.1, "top_p": 0.5,
      "top_k": 3, "min_p": 0.05, "seed": 4, "stop": ["###"], "presence_penalty": 0.2, "frequency_penalty": 0.3}),
    ("num_predict -1 leaves the runtime's default; format json",
     {"model": "m", "messages": MSG, "format": "json", "options": {"num_predict": -1}},
     {"model": "m", "stream": True, "messages": MSG, "response_format": {"type": "json_object"}}),
    ("format schema", {"model": "m", "messages": MSG, "format": {"type": "object"}},
     {"model": "m", "stream": True, "messages": MSG,
      "response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": {"type": "object"}}}}),
    ("images become data URLs",
     {"model": "m", "messages": [{"role": "user", "content": "what?", "images": ["/9j/4AAQ"]}]},
     {"model": "m", "stream": True, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
         {"type": "text", "text": "what?"}]}]}),
    ("tool calls and results paired by name",
     {"model": "m", "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}], "messages": [
         {"role": "user", "content": "?"},
         {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w", "arguments": {"c": "x"}}}]},
         {"role": "tool", "content": "sunny", "tool_name": "w"}]},
     {"model": "m", "stream": True, "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}],
      "messages": [{"role": "user", "content": "?"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1_0", "type": "function", "function": {"name": "w", "arguments": '{"c": "x"}'}}]},
                   {"role": "tool", "tool_call_id": "call_1_0", "content": "sunny"}]}),
]


@pytest.mark.parametrize("name,body,want", CHAT, ids=[c[0] for c in CHAT])
def test_chat_translation(name, body, want):
    assert ollama.chat_to_openai(body) == ("chat", want)


@pytest.mark.parametrize("body,want", [
    ({"model": "m", "prompt": "Once", "system": "S"},
     ("chat", {"model": "m", "stream": True, "messages": [{"role": "system", "content": "S"},
                                                         {"role": "user", "content": "Once"}]})),
    ({"model": "m", "prompt": "Once", "raw": True, "stream": False},
     ("completions", {"model": "m", "stream": False, "prompt": "Once"})),
    ({"model": "m", "prompt": "def f(", "suffix": "return 1"},
     ("completions", {"model": "m", "stream": True, "prompt": "def f(", "suffix": "return 1"})),
    ({"model": "m"}, ("chat", {"model": "m", "stream": False, "max_tokens": 1,
                               "messages": [{"role": "user", "content": ""}]})),
])
def test_generate_translation(body, want):
    assert ollama.generate_to_openai(body) == want


def test_embed_translation():
    assert ollama.embed_to_openai({"model": "m", "input": ["a", "b"], "truncate": True, "dimensions": 8}) == \
        ("embeddings", {"model": "m", "input": ["a", "b"], "dimensions": 8})
    assert ollama.embed_to_openai({"model": "m", "prompt": "a"}) == ("embeddings", {"model": "m", "input": "a"})


@pytest.mark.parametrize("fn,body,param", [
    (ollama.chat_to_openai, {"messages": MSG}, "model"),
    (ollama.chat_to_openai, {"model": "m", "messages": [{"role": "boss"}]}, "messages.0"),
    (ollama.chat_to_openai, {"model": "m", "messages": [{"role": "user", "content": ["x"]}]}, "messages.0"),
    (ollama.chat_to_openai, {"model": "m", "messages": MSG, "options": {"temperature": "hot"}}, "temperature"),
    (ollama.chat_to_openai, {"model": "m", "messages": MSG, "options": {"num_ctx": "big"}}, "num_ctx"),
    (ollama.chat_to_openai, {"model": "m", "messages": MSG, "options": []}, "options"),
    (ollama.chat_to_openai, {"model": "m", "messages": MSG, "format": 3}, "format"),
    (ollama.chat_to_openai, {"model": "m", "messages": MSG, "keep_alive": []}, "keep_alive"),
    (ollama.chat_to_openai, {"model": "m", "messages": MSG, "tools": [1]}, "tools.0"),
    (ollama.generate_to_openai, {"model": "m", "prompt": 5}, "prompt"),
    (ollama.generate_to_openai, {"model": "m", "prompt": "x", "images": "abc"}, "images"),
    (ollama.embed_to_openai, {"model": "m", "input": [1]}, "input"),
])
def test_bad_requests(fn, body, param):
    with pytest.raises(InvalidRequest) as info:
        fn(body)
    assert info.value.param == param


CALL = Call("m", "r", 0, {"prompt": "x"})


def test_answers():
    chat = json.loads(ollama.chat_from_openai({"choices": [{"message": {"content": "hey", "tool_calls": [
        {"id": "c1", "function": {"name": "w", "arguments": '{"c": 1}'}}]}, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 6}}, CALL))
    assert chat["message"] == {"role": "assistant", "content": "hey", "tool_calls": [
        {"id": "c1", "function": {"index": 0, "name": "w", "arguments": {"c": 1}}}]}
    assert chat["done"] is True and chat["done_reason"] == "stop"
    assert chat["prompt_eval_count"] == 4 and chat["eval_count"] == 6 and chat["created_at"] == "1970-01-01T00:00:00Z"
    gen = json.loads(ollama.generate_from_openai({"choices": [{"text": "abc", "finish_reason": "length"}],
                                                  "usage": {"prompt_tokens": 1, "completion_tokens": 3}}, CALL))
    assert gen["response"] == "abc" and gen["done_reason"] == "length" and gen["eval_count"] == 3
    load = json.loads(ollama.generate_from_openai({"choices": [{"text": "z"}]}, Call("m", "r", 0, {})))
    assert load["done_reason"] == "load" and load["response"] == ""
    emb = json.loads(ollama.embed_from_openai({"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}],
                                               "usage": {"prompt_tokens": 2}}, Call("m", "r", 0, {"input": ["a", "b"]})))
    assert emb["embeddings"] == [[1.0], [2.0]] and emb["prompt_eval_count"] == 2 and emb["model"] == "m"
    legacy = json.loads(ollama.embed_from_openai({"data": [{"index": 0, "embedding": [1.0]}]}, Call("m", "r", 0, {"prompt": "a"})))
    assert legacy == {"embedding": [1.0]}


def lines(raw: bytes) -> list[dict]:
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def test_chat_stream_with_tool_call():
    s = ollama.NdjsonStream(Call("m", "r", 0, {}), chat=True)
    raw = b"".join([
        s.feed({"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
        s.feed({"choices": [{"delta": {"content": "Hi"}}]}),
        s.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "w", "arguments": ""}}]}}]}),
        s.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"c":'}}]}}]}),
        s.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' 2}'}}]}}]}),
        s.feed({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}),
        s.finish(3, 8),
    ])
    out = lines(raw)
    assert out[0] == {"model": "m", "created_at": "1970-01-01T00:00:00Z",
                      "message": {"role": "assistant", "content": "Hi"}, "done": False}
    assert out[1]["message"]["tool_calls"] == [{"id": "c1", "function": {"index": 0, "name": "w", "arguments": {"c": 2}}}]
    assert out[2]["done"] is True and out[2]["prompt_eval_count"] == 3 and out[2]["eval_count"] == 8
    assert len(out) == 3


def test_generate_stream_from_completions():
    s = ollama.NdjsonStream(Call("m", "r", 0, {}), chat=False)
    raw = s.feed({"choices": [{"text": "Once", "finish_reason": None}]}) + \
        s.feed({"choices": [{"text": "", "finish_reason": "length"}]}) + s.finish(2, 1)
    out = lines(raw)
    assert out[0]["response"] == "Once" and out[0]["done"] is False
    assert out[1]["done_reason"] == "length" and out[1]["response"] == ""


VIEWS = [ModelView("a", 0, 2048, True, "gguf"), ModelView("b", 0, None, False, "safetensors")]
CHAT_CARD = ModelCard(size=1234, digest="ab" * 32, family="llama", parameter_size="0.5M", quantization="F16",
                      tools=True)
EMBED_CARD = ModelCard(size=99, digest="cd" * 32, family="bert", embedding=True)


def test_listings():
    assert json.loads(ollama.version(VIEWS, None)) == {"version": ollama.VERSION}
    # Ollama lists names with their tag (Open WebUI tells them apart from the OpenAI connection's by it).
    assert [m["name"] for m in json.loads(ollama.tags(VIEWS, None))["models"]] == ["a:latest", "b:latest"]
    [loaded] = json.loads(ollama.ps(VIEWS, None))["models"]
    assert loaded["name"] == "a:latest" and loaded["context_length"] == 2048
    shown = json.loads(ollama.show(VIEWS, {"model": "a:latest"}))
    assert shown["details"]["format"] == "gguf" and shown["model_info"]["unknown.context_length"] == 2048
    with pytest.raises(ModelNotFound):
        ollama.show(VIEWS, {"model": "zzz"})
    with pytest.raises(InvalidRequest):
        ollama.show(VIEWS, {})


@pytest.mark.parametrize("name, listed", [("a", "a:latest"), ("qwen2.5:0.5b", "qwen2.5:0.5b"),
                                          ("hf.co/org/m", "hf.co/org/m:latest"), ("host:5000/m", "host:5000/m:latest")])
def test_tagged_names(name, listed):
    assert ollama.tagged(name) == listed


def test_listings_from_cards():
    views = [ModelView("chat", 0, 4096, True, "gguf", CHAT_CARD), ModelView("emb", 0, 512, True, "gguf", EMBED_CARD),
             ModelView("ext", 0, None, True, "", None)]
    listed = {m["name"]: m for m in json.loads(ollama.tags(views, None))["models"]}
    assert listed["chat:latest"]["size"] == 1234 and listed["chat:latest"]["digest"] == "ab" * 32
    assert listed["chat:latest"]["details"] == {"parent_model": "", "format": "gguf", "family": "llama",
                                                "families": ["llama"], "parameter_size": "0.5M",
                                                "quantization_level": "F16"}
    assert listed["ext:latest"]["size"] == 0 and listed["ext:latest"]["details"]["format"] == "unknown"
    assert json.loads(ollama.ps(views, None))["models"][1]["digest"] == "cd" * 32
    chat = json.loads(ollama.show(views, {"model": "chat"}))
    assert chat["capabilities"] == ["completion", "tools"]
    assert chat["model_info"] == {"general.architecture": "llama", "llama.context_length": 4096}
    assert json.loads(ollama.show(views, {"name": "emb:latest"}))["capabilities"] == ["embedding"]
    assert json.loads(ollama.show(views, {"model": "ext"}))["capabilities"] == ["completion"]


def test_model_management_is_refused():
    with pytest.raises(ollama.ManagedByConfig) as caught:
        ollama.managed([], {"model": "llama3"})
    assert caught.value.status == 403 and "appliance.toml" in caught.value.message
    status, body = ollama.error(caught.value, "r")
    assert status == 403 and list(json.loads(body)) == ["error"]


def test_error_shape():
    assert ollama.error(RateLimited("slow down", retry_after=2, reason="rpm"), "r") == (429, b'{"error": "slow down"}')
