"""OpenAI Responses <-> chat completions: the pure translators, table-tested without a server."""

from __future__ import annotations

import json

import pytest

from node.errors import InvalidRequest, ModelNotFound
from node.gateway import responses
from node.gateway.adapter import Call

REQUESTS = [
    ("text input", {"model": "m", "input": "hi"}, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("instructions, sampling, limit, stream",
     {"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 9, "temperature": 0.5,
      "top_p": 0.9, "stream": True, "store": False, "user": "u"},
     {"model": "m", "stream": True, "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "user": "u",
      "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}),
    ("message items, developer role, parts",
     {"model": "m", "input": [
         {"role": "developer", "content": "rules"},
         {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look"},
                                                        {"type": "input_image", "image_url": "data:image/png;base64,x"}]},
         {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}]},
     {"model": "m", "messages": [
         {"role": "system", "content": "rules"},
         {"role": "user", "content": [{"type": "text", "text": "look"},
                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,x"}}]},
         {"role": "assistant", "content": "ok"}]}),
    ("function calls (parallel) and outputs; tools; tool_choice; json schema",
     {"model": "m", "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}, "strict": True}],
      "tool_choice": {"type": "function", "name": "w"}, "parallel_tool_calls": False,
      "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
      "input": [{"role": "user", "content": "?"},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"a\":1}"},
                {"type": "reasoning", "id": "r", "summary": []},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": "two"}]},
     {"model": "m", "parallel_tool_calls": False,
      "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}, "strict": True}}],
      "tool_choice": {"type": "function", "function": {"name": "w"}},
      "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"},
                                                                 "strict": False}},
      "messages": [{"role": "user", "content": "?"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}},
                       {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "{\"a\":1}"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "one"},
                   {"role": "tool", "tool_call_id": "c2", "content": "two"}]}),
]


@pytest.mark.parametrize("name,body,want", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_translation(name, body, want):
    assert responses.to_openai(body) == ("chat", want)


@pytest.mark.parametrize("body,param,says", [
    ({"input": "x"}, "model", "required"),
    ({"model": "m", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
    ({"model": "m", "input": "x", "store": True}, "store", "stateless"),
    ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation", "stateless"),
    ({"model": "m", "input": "x", "background": True}, "background", "stateless"),
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools.0", "function tools"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input.0", "stateless"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input.0.content.0", "not supported"),
    ({"model": "m", "input": 5}, "input", "string"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": 1}]}, "input.0", "call_id"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens", "at least"),
    ({"model": "m", "input": "x", "temperature": "warm"}, "temperature", "number"),
    ({"model": "m", "input": "x", "tool_choice": "sometimes"}, "tool_choice", "auto"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text", "json_schema"),
])
def test_untranslatable_is_400(body, param, says):
    with pytest.raises(InvalidRequest) as info:
        responses.to_openai(body)
    assert info.value.param == param and says in info.value.message


CALL = Call("m", "r1", 100, {"instructions": "be brief", "max_output_tokens": 5})


def test_response_translation():
    got = json.loads(responses.from_openai({"choices": [{"message": {"content": "hi", "tool_calls": [
        {"id": "c1", "function": {"name": "w", "arguments": "{}"}}]}, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, CALL))
    assert got["id"] == "resp_r1" and got["object"] == "response" and got["status"] == "completed"
    assert got["store"] is False and got["instructions"] == "be brief" and got["max_output_tokens"] == 5
    assert got["output"] == [
        {"type": "message", "id": "msg_r1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "hi", "annotations": []}]},
        {"type": "function_call", "id": "fc_r1_0", "call_id": "c1", "name": "w", "arguments": "{}", "status": "completed"}]
    assert got["usage"]["input_tokens"] == 3 and got["usage"]["output_tokens"] == 4 and got["usage"]["total_tokens"] == 7
    cut = json.loads(responses.from_openai({"choices": [{"message": {"content": "h"}, "finish_reason": "length"}]}, CALL))
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}


def parse(raw: bytes) -> list[dict]:
    out = []
    for block in raw.split(b"\n\n"):
        if block:
            name, data = block.split(b"\n")
            obj = json.loads(data[6:])
            assert obj["type"] == name[7:].decode()
            out.append(obj)
    return out


def test_stream_text_then_function_call():
    s = responses.ResponseStream(Call("m", "r", 0, {}))
    raw = b"".join([
        s.feed({"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
        s.feed({"choices": [{"delta": {"content": "He"}}]}), s.feed({"choices": [{"delta": {"content": "y"}}]}),
        s.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "w", "arguments": ""}}]}}]}),
        s.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}),
        s.feed({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}),
        s.finish(2, 3),
    ])
    ev = parse(raw)
    assert [e["type"] for e in ev] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in ev] == list(range(len(ev)))
    assert ev[6]["text"] == "Hey" and ev[9]["output_index"] == 1 and ev[11]["arguments"] == "{}"
    final = ev[-1]["response"]
    assert final["status"] == "completed" and [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["usage"]["input_tokens"] == 2 and final["usage"]["output_tokens"] == 3


def test_stream_cut_by_the_limit_is_incomplete_and_failure_is_failed():
    s = responses.ResponseStream(Call("m", "r", 0, {}))
    s.feed({"choices": [{"delta": {"content": "a"}, "finish_reason": "length"}]})
    assert parse(s.finish(1, 1))[-1]["type"] == "response.incomplete"
    s = responses.ResponseStream(Call("m", "r", 0, {}))
    [*_, failed] = parse(s.fail(ModelNotFound("gone")))
    assert failed["type"] == "response.failed" and failed["response"]["error"]["message"] == "gone"
