"""Every translator and parser of the gateway is linear in a hostile input: doubling it at most ~doubles the time.

Each case builds an input of size N and 2N and times the pure function in-process with
the CPU time of this process (robust on a loaded machine), best of several runs, sized so
one run takes tens of milliseconds. Quadratic work shows as 4x; the bound is 2.5x.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from node.errors import InvalidRequest
from node.gateway import anthropic, context, intake, ollama, responses
from node.gateway.adapter import Call
from node.gateway.bodies import scrub, worker_error
from node.gateway.sse import SseRelay

RATIO = 2.5
RUNS = 7


def _cpu(fn: Callable[[Any], Any], args: tuple[Any, Any]) -> tuple[float, float]:
    # Runs of the two sizes alternate, so a change in the machine's load meets both alike; best of RUNS each.
    # The cyclic GC is paused while timing: its full collections come at thresholds of the heap's
    # size (amortized linear), which would make one size pay for one and the other not.
    best = [float("inf"), float("inf")]
    gc.collect()
    gc.disable()
    try:
        for _ in range(RUNS):
            for i, arg in enumerate(args):
                t = time.process_time()
                fn(arg)
                best[i] = min(best[i], time.process_time() - t)
    finally:
        gc.enable()
    return best[0], best[1]


def assert_linear(make: Callable[[int], Any], run: Callable[[Any], Any], n: int) -> None:
    small, big = make(n), make(2 * n)
    run(small)  # warm up (imports, caches)
    t1, t2 = _cpu(run, (small, big))
    assert t1 > 0.002, f"the case is too small to time ({t1 * 1000:.2f} ms): raise n"
    assert t2 <= RATIO * t1, f"doubling the input took {t2 / t1:.1f}x the time ({t1 * 1000:.1f} -> {t2 * 1000:.1f} ms)"


def _swallow(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The function, with its 400 (if any) as its result: refusing must be linear too."""
    def run(arg: Any) -> Any:
        try:
            return fn(arg)
        except Exception as exc:  # noqa: BLE001 - the refusal is the answer being timed
            return exc
    return run


# -- Ollama ---------------------------------------------------------------------
def ollama_tool_results(n: int) -> dict[str, Any]:
    """One assistant turn with n tool calls, then n results whose names match none (issue 22: 5 s at n=16,000)."""
    calls = [{"function": {"name": f"f{i}", "arguments": {}}} for i in range(n)]
    results = [{"role": "tool", "tool_name": "nomatch", "content": "r"} for _ in range(n)]
    return {"model": "m", "messages": [{"role": "assistant", "content": "", "tool_calls": calls}, *results]}


def ollama_named_results(n: int) -> dict[str, Any]:
    """Results answering the newest call first (each search would reach the end of the list)."""
    calls = [{"function": {"name": f"f{i}", "arguments": {}}} for i in range(n)]
    results = [{"role": "tool", "tool_name": f"f{i}", "content": "r"} for i in reversed(range(n))]
    return {"model": "m", "messages": [{"role": "assistant", "content": "", "tool_calls": calls}, *results]}


@pytest.mark.parametrize("make", [ollama_tool_results, ollama_named_results])
def test_ollama_chat_translation_is_linear_in_tool_results(make):
    assert_linear(make, ollama.chat_to_openai, 8000)


def test_ollama_chat_translation_still_pairs_results_with_calls():
    _, out = ollama.chat_to_openai({"model": "m", "messages": [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "a"}}, {"function": {"name": "b"}},
                                                            {"function": {"name": "a"}}]},
        {"role": "tool", "tool_name": "a", "content": "1"}, {"role": "tool", "tool_name": "x", "content": "2"},
        {"role": "tool", "tool_name": "a", "content": "3"}, {"role": "tool", "content": "4"}]})
    assert [m.get("tool_call_id") for m in out["messages"][1:]] == ["call_0_0", "call_0_1", "call_0_2", "call_4"]


def _ollama_stream(n: int) -> list[dict[str, Any]]:
    return [{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "x" * 8}}]}}]}
            for _ in range(n)]


def _feed_all(make_stream: Callable[[], Any]) -> Callable[[list[dict[str, Any]]], bytes]:
    def run(chunks: list[dict[str, Any]]) -> bytes:
        tr = make_stream()
        return b"".join(tr.feed(c) for c in chunks) + tr.finish(1, len(chunks))
    return run


CALL = Call("m", "rid", 0, {"model": "m"})


def test_ollama_stream_is_linear_in_tool_call_pieces():
    assert_linear(_ollama_stream, _feed_all(lambda: ollama.NdjsonStream(CALL, chat=True)), 20000)


# -- Anthropic ------------------------------------------------------------------
def anthropic_tools(n: int) -> dict[str, Any]:
    uses = [{"type": "tool_use", "id": f"t{i}", "name": f"f{i}", "input": {"a": i}} for i in range(n)]
    results = [{"type": "tool_result", "tool_use_id": f"t{i}", "content": [{"type": "text", "text": "r"}]}
               for i in range(n)]
    return {"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "s"}] * n,
            "stop_sequences": ["a"] * 16,
            "messages": [{"role": "assistant", "content": uses}, {"role": "user", "content": results}]}


def test_anthropic_translation_is_linear():
    assert_linear(anthropic_tools, anthropic.to_openai, 8000)


def test_anthropic_stream_is_linear_in_tool_calls_per_chunk():
    def one_chunk(n: int) -> list[dict[str, Any]]:
        return [{"choices": [{"delta": {"tool_calls": [{"index": i, "function": {"name": "f", "arguments": "{}"}}
                                                       for i in range(n)]}}]}]
    assert_linear(one_chunk, _feed_all(lambda: anthropic.MessageStream(CALL)), 8000)


# -- Responses ------------------------------------------------------------------
def responses_items(n: int) -> dict[str, Any]:
    calls = [{"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"} for i in range(n)]
    outs = [{"type": "function_call_output", "call_id": f"c{i}", "output": [{"type": "input_text", "text": "r"}]}
            for i in range(n)]
    return {"model": "m", "input": [{"role": "assistant", "content": [{"type": "output_text", "text": "t"}] * n},
                                    *calls, *outs]}


def test_responses_translation_is_linear():
    assert_linear(responses_items, responses.to_openai, 8000)


def test_responses_stream_is_linear_in_tool_calls_per_chunk():
    def one_chunk(n: int) -> list[dict[str, Any]]:
        return [{"choices": [{"delta": {"tool_calls": [{"index": i, "function": {"name": "f", "arguments": "{}"}}
                                                       for i in range(n)]}}]}]
    assert_linear(one_chunk, _feed_all(lambda: responses.ResponseStream(CALL)), 4000)


# -- the body parse and the field checks (every API) ----------------------------------
def _raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


BODIES = {  # name: (hostile body of size n, n)
    "surrogate-pairs": (lambda n: _raw({"model": "m", "messages": [{"role": "user", "content": "\U0001f600" * 4}] * n}),
                        10000),  # escapes present: the body is re-encoded
    "lone-surrogate-at-the-end": (lambda n: _raw({"model": "m", "messages": [{"role": "user", "content": "\U0001f600"}]
                                                  * n + ["\ud800"]}), 10000),  # and walked to name the field
    "long-keys": (lambda n: _raw({"model": "m", "x": {"z": "\ud800", ("k" * 1000): [[{}] * 20] * n}}), 10000),
    "many-floats": (lambda n: b'{"model": "m", "x": [' + b",".join([b"1.5e3"] * n) + b"]}", 20000),
    "long-fields": (lambda n: _raw({"model": "m", "user": "u" * n, "metadata": {"k": "v" * n}}), 2_000_000),
    "stop-lists": (lambda n: _raw({"model": "m", "stop": ["s"] * n, "stop_sequences": ["s"] * n,
                                   "options": {"stop": ["s"] * n}}), 100000),
}


@pytest.mark.parametrize("case", BODIES)
@pytest.mark.parametrize("api", ["openai", "anthropic", "responses", "ollama"])
def test_body_decode_and_checks_are_linear(case, api):
    make, n = BODIES[case]
    assert_linear(make, _swallow(lambda raw: intake.decode(raw, api)), n)


def test_a_long_number_is_refused_before_float_parses_it():
    # float() of a fraction with 800k digits takes ~7x the time of 400k: refused by its length instead.
    with pytest.raises(InvalidRequest, match="more than 100 characters"):
        intake.decode(b'{"model": "m", "temperature": 0.' + b"1" * 400_000 + b"}", "openai")
    assert intake.decode(b'{"model": "m", "temperature": 0.' + b"1" * 90 + b"}", "openai")["temperature"] > 0.1


# -- the context check ------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda n: {"messages": [{"role": "user", "content": ""}] * n},
    lambda n: {"messages": [{"role": "user", "content": [{"type": "text", "text": "ab" * 50}] * 4}] * n},
    lambda n: {"prompt": ["a" * 64] * n},
], ids=["empty-messages", "text-parts", "prompt-batch"])
def test_context_check_is_linear(make):
    endpoint = "completions" if "prompt" in make(1) else "chat"
    assert_linear(make, _swallow(lambda req: context.check(req, endpoint, 1 << 30)), 40000)


# -- SSE relay and worker errors ----------------------------------------------------
def test_sse_relay_is_linear_in_a_dribbled_event():
    def pieces(n: int) -> list[bytes]:
        return [b"data: {"] + [b'"x": 1, '] * n + [b"}\n\n"]

    def run(chunks: list[bytes]) -> int:
        relay = SseRelay(drop_usage=True, count_content=True)
        return sum(len(relay.feed(c)) for c in chunks)
    assert_linear(pieces, run, 60000)


def test_sse_relay_still_relays_whole_events_from_dribbles():
    relay = SseRelay(drop_usage=False, count_content=True)
    out = b"".join(relay.feed(bytes([b])) for b in b'data: {"content":"a"}\n\ndata: [DONE]\n\n')
    assert out == b'data: {"content":"a"}\n\ndata: [DONE]\n\n' and relay.saw_done and relay.content_events == 1
    relay = SseRelay(drop_usage=False, count_content=False)
    assert relay.feed(b"data: x\n") == b"" and relay.feed(b"\ndata: y") == b"data: x\n\n" and relay.buf == b"data: y"


def test_worker_error_scrub_is_linear():
    def message(n: int) -> bytes:
        return json.dumps({"error": {"message": "/usr/a.b.c" * n + "x.py " * n}}).encode()
    assert_linear(message, lambda raw: worker_error(raw, 400), 200000)
    assert "<path>" in scrub("at /usr/lib/python3/x.py line 3") and "/usr" not in scrub("at /usr/lib/python3/x.py")
