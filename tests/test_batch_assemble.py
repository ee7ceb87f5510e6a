"""A streamed answer put back together (node/batches/assemble.py): the shape the unstreamed request gives."""

from __future__ import annotations

import json
import time

import pytest

from node.batches.assemble import Unassembled, assemble, events


def sse(*chunks) -> bytes:
    return b"".join(b"data: " + (c if isinstance(c, bytes) else json.dumps(c).encode()) + b"\n\n"
                    for c in chunks) + b"data: [DONE]\n\n"


HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "system_fingerprint": "fp"}


def chunk(*choices, **extra):
    return {**HEAD, "choices": list(choices), **extra}


def test_chat_content_role_finish_and_usage():
    body = sse(chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}),
               chunk({"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}),
               chunk({"index": 0, "delta": {"content": "lo"}, "finish_reason": None}),
               chunk({"index": 0, "delta": {}, "finish_reason": "stop"}),
               chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}))
    assert assemble(body, "chat") == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m", "system_fingerprint": "fp",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def test_chat_tool_calls_reasoning_logprobs_and_two_choices():
    body = sse(
        chunk({"index": 1, "delta": {"role": "assistant", "reasoning_content": "think"}},
              {"index": 0, "delta": {"role": "assistant", "tool_calls": [
                  {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}},
                                                     {"index": 1, "id": "call_2", "function": {"name": "other"}}]}},
              {"index": 1, "delta": {"reasoning_content": "ing", "content": "ok"},
               "logprobs": {"content": [{"token": "ok", "logprob": -0.1}]}}),
        chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"},
              {"index": 1, "delta": {}, "finish_reason": "stop", "logprobs": {"content": [{"token": "!"}]}}))
    got = assemble(body, "chat")
    assert "usage" not in got
    first, second = got["choices"]
    assert first == {"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "other", "arguments": ""}}]}}
    assert second["message"] == {"role": "assistant", "content": "ok", "reasoning_content": "thinking"}
    assert second["logprobs"] == {"content": [{"token": "ok", "logprob": -0.1}, {"token": "!"}]}


def test_completions_text_and_logprobs():
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    body = sse({**head, "choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [-1]},
                                     "finish_reason": None}]},
               {**head, "choices": [{"index": 0, "text": "b", "logprobs": {"tokens": ["b"], "token_logprobs": [-2]},
                                     "finish_reason": "length"}]},
               {**head, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
    assert assemble(body, "completions") == {
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "text": "ab", "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1, -2]},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


def test_crlf_framing_and_multiline_data():
    assert events(b'data: {"a":\r\ndata: 1}\r\n\r\ndata: [DONE]\r\n\r\n') == [b'{"a":\n1}', b"[DONE]"]


@pytest.mark.parametrize("body", [
    b"",                                                                      # nothing at all
    sse(),                                                                     # only [DONE]
    b"data: {not json\n\n",
    b"data: [1, 2]\n\n",
    sse(chunk({"index": 0, "delta": {"content": "x"}}), {"error": {"message": "the worker failed", "code": "boom"}}),
])
def test_what_makes_no_answer_is_refused(body):
    with pytest.raises(Unassembled) as err:
        assemble(body, "chat")
    assert err.value.error["message"]


def test_the_worker_error_event_is_kept():
    with pytest.raises(Unassembled) as err:
        assemble(sse({"error": {"message": "context exceeded", "type": "invalid_request_error", "code": "ctx"}}), "chat")
    assert err.value.error == {"message": "context exceeded", "type": "invalid_request_error", "code": "ctx"}


def test_linear_in_the_streams_size():
    def timed(n: int) -> float:
        body = sse(*(chunk({"index": 0, "delta": {"content": "x", "tool_calls": [
            {"index": i % 4, "function": {"arguments": "y"}}]}}) for i in range(n)))
        t0 = time.perf_counter()
        got = assemble(body, "chat")
        assert len(got["choices"][0]["message"]["content"]) == n
        return time.perf_counter() - t0
    small, large = min(timed(20_000) for _ in range(3)), min(timed(40_000) for _ in range(3))
    assert large < 2.5 * small
