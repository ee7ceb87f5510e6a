"""Anthropic Messages <-> OpenAI chat completions: the pure translators, table-tested without a server."""

from __future__ import annotations

import json

import pytest

from node.errors import AuthenticationError, InvalidRequest, ModelNotFound, NoReadyReplica, RateLimited, UpstreamError
from node.gateway import anthropic
from node.gateway.adapter import Call, sse_chunks

BASE = {"model": "m", "max_tokens": 16}

REQUESTS = [
    ("plain text",
     {**BASE, "messages": [{"role": "user", "content": "hi"}]},
     {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
    ("system string, sampling, stop, metadata, stream",
     {**BASE, "system": "be brief", "temperature": 0.2, "top_p": 0.9, "top_k": 5, "stop_sequences": ["END"],
      "metadata": {"user_id": "u1"}, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
     {"model": "m", "max_tokens": 16, "stream": True, "temperature": 0.2, "top_p": 0.9, "top_k": 5, "stop": ["END"],
      "user": "u1", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}),
    ("system blocks, text blocks joined",
     {**BASE, "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
      "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}]},
     {"model": "m", "max_tokens": 16, "messages": [{"role": "system", "content": "a\nb"},
                                                   {"role": "user", "content": "x\ny"}]}),
    ("base64 image -> data URL",
     {**BASE, "messages": [{"role": "user", "content": [
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
         {"type": "text", "text": "what is it?"}]}]},
     {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
         {"type": "text", "text": "what is it?"}]}]}),
    ("tools, tool_use and tool_result",
     {**BASE, "tools": [{"name": "weather", "description": "d", "input_schema": {"type": "object"}}],
      "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
      "messages": [{"role": "user", "content": "weather?"},
                   {"role": "assistant", "content": [{"type": "text", "text": "checking"},
                                                     {"type": "tool_use", "id": "t1", "name": "weather",
                                                      "input": {"city": "Oslo"}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                                                {"type": "text", "text": "and tomorrow?"}]}]},
     {"model": "m", "max_tokens": 16, "parallel_tool_calls": False,
      "tools": [{"type": "function", "function": {"name": "weather", "description": "d",
                                                  "parameters": {"type": "object"}}}],
      "tool_choice": {"type": "function", "function": {"name": "weather"}},
      "messages": [{"role": "user", "content": "weather?"},
                   {"role": "assistant", "content": "checking", "tool_calls": [
                       {"id": "t1", "type": "function", "function": {"name": "weather",
                                                                     "arguments": '{"city": "Oslo"}'}}]},
                   {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
                   {"role": "user", "content": "and tomorrow?"}]}),
    ("tool_choice any -> required; error results marked",
     {**BASE, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": [
         {"type": "tool_result", "tool_use_id": "t9", "is_error": True, "content": [{"type": "text", "text": "boom"}]}]}]},
     {"model": "m", "max_tokens": 16, "tool_choice": "required",
      "messages": [{"role": "tool", "tool_call_id": "t9", "content": "Error: boom"}]}),
]


@pytest.mark.parametrize("name,body,want", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_translation(name, body, want):
    endpoint, got = anthropic.to_openai(body)
    assert endpoint == "chat" and got == want


def test_count_tokens_asks_for_one_token_and_drops_sampling():
    _, got = anthropic.to_openai({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1,
                                  "stream": True}, counting=True)
    assert got == {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}


BAD = [
    ({"messages": []}, "model"),
    ({"model": "m", "messages": []}, "max_tokens"),
    ({**BASE, "max_tokens": True, "messages": []}, "max_tokens"),
    ({**BASE, "max_tokens": 0, "messages": []}, "max_tokens"),
    ({**BASE, "messages": "hi"}, "messages"),
    ({**BASE, "messages": [{"role": "system", "content": "x"}]}, "messages.0"),
    ({**BASE, "messages": [{"role": "user", "content": 5}]}, "messages.0"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "document"}]}]}, "messages.0.content.0"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
     "messages.0.content.0"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b"}]}]},
     "messages.0.content.0"),
    ({**BASE, "system": 3, "messages": []}, "system"),
    ({**BASE, "temperature": "hot", "messages": []}, "temperature"),
    ({**BASE, "stop_sequences": [1], "messages": []}, "stop_sequences"),
    ({**BASE, "tools": [{"name": "x"}], "messages": []}, "tools.0"),
    ({**BASE, "tools": [{"type": "web_search_20250305", "name": "web_search"}], "messages": []}, "tools.0"),
    ({**BASE, "tool_choice": {"type": "maybe"}, "messages": []}, "tool_choice"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_requests_are_400_naming_the_field(body, param):
    with pytest.raises(InvalidRequest) as info:
        anthropic.to_openai(body)
    assert info.value.param == param and info.value.status == 400


CALL = Call("m", "rid1", 0, {"stop_sequences": ["END"]})


@pytest.mark.parametrize("choice,content,stop", [
    ({"message": {"content": "hello"}, "finish_reason": "stop"}, [{"type": "text", "text": "hello"}], ("end_turn", None)),
    ({"message": {"content": "hel"}, "finish_reason": "length"}, [{"type": "text", "text": "hel"}], ("max_tokens", None)),
    ({"message": {"content": "x"}, "finish_reason": "stop", "stop_reason": "END"}, [{"type": "text", "text": "x"}],
     ("stop_sequence", "END")),
    ({"message": {"content": None, "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
      "finish_reason": "tool_calls"}, [{"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}}], ("tool_use", None)),
    ({"message": {"content": "", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{bad"}}]},
      "finish_reason": "tool_calls"}, [{"type": "tool_use", "id": "c1", "name": "f", "input": {"arguments": "{bad"}}],
     ("tool_use", None)),
])
def test_response_translation(choice, content, stop):
    obj = {"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    got = json.loads(anthropic.from_openai(obj, CALL))
    assert got["id"] == "msg_rid1" and got["type"] == "message" and got["role"] == "assistant" and got["model"] == "m"
    assert got["content"] == content and (got["stop_reason"], got["stop_sequence"]) == stop
    assert got["usage"]["input_tokens"] == 3 and got["usage"]["output_tokens"] == 2


def test_count_tokens_answer():
    assert json.loads(anthropic.count_from_openai({"usage": {"prompt_tokens": 12, "completion_tokens": 1}}, CALL)) == \
        {"input_tokens": 12}


def events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.split(b"\n\n"):
        if block:
            name, data = block.split(b"\n")
            assert name.startswith(b"event: ") and data.startswith(b"data: ")
            obj = json.loads(data[6:])
            assert obj["type"] == name[7:].decode()
            out.append((obj["type"], obj))
    return out


def chunk(delta=None, finish=None):
    return {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}


def test_stream_text_then_tool_call():
    s = anthropic.MessageStream(Call("m", "r", 0, {}))
    raw = b"".join([
        s.feed(chunk({"role": "assistant", "content": ""})),
        s.feed(chunk({"content": "Hel"})), s.feed(chunk({"content": "lo"})),
        s.feed(chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                      "function": {"name": "f", "arguments": ""}}]})),
        s.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]})),
        s.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]})),
        s.feed(chunk(finish="tool_calls")),
        s.feed({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}),
        s.finish(5, 9),
    ])
    ev = events(raw)
    assert [t for t, _ in ev] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert ev[0][1]["message"]["id"] == "msg_r" and ev[0][1]["message"]["content"] == []
    assert [e["delta"]["text"] for t, e in ev if t == "content_block_delta" and e["index"] == 0] == ["Hel", "lo"]
    assert ev[6][1]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
    assert "".join(e["delta"]["partial_json"] for t, e in ev if t == "content_block_delta" and e["index"] == 1) == \
        '{"a": 1}'
    assert ev[10][1]["delta"]["stop_reason"] == "tool_use"
    assert ev[10][1]["usage"]["input_tokens"] == 5 and ev[10][1]["usage"]["output_tokens"] == 9


def test_stream_that_ends_before_any_chunk_is_still_a_whole_message():
    s = anthropic.MessageStream(Call("m", "r", 0, {}))
    assert [t for t, _ in events(s.finish(0, 0))] == ["message_start", "ping", "message_delta", "message_stop"]


def test_stream_failure_is_an_error_event():
    s = anthropic.MessageStream(Call("m", "r", 0, {}))
    s.feed(chunk({"content": "a"}))
    [(kind, body)] = events(s.fail(UpstreamError("worker died")))
    assert kind == "error" and body["error"] == {"type": "api_error", "message": "worker died"}


@pytest.mark.parametrize("err,status,kind", [
    (InvalidRequest("x"), 400, "invalid_request_error"),
    (AuthenticationError("x"), 401, "authentication_error"),
    (ModelNotFound("x"), 404, "not_found_error"),
    (RateLimited("x", retry_after=1, reason="rpm"), 429, "rate_limit_error"),
    (NoReadyReplica("x"), 503, "overloaded_error"),
    (UpstreamError("x"), 502, "api_error"),
])
def test_error_shape(err, status, kind):
    got_status, body = anthropic.error(err, "rid7")
    assert got_status == status
    assert json.loads(body) == {"type": "error", "error": {"type": kind, "message": "x"}, "request_id": "rid7"}


def test_sse_chunks_reads_whole_events_only():
    raw = b'data: {"a": 1}\n\n: comment\n\ndata: [DONE]\n\ndata: {"b": 2}\n\n'
    assert sse_chunks(raw) == [{"a": 1}, {"b": 2}]
