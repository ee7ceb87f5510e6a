"""Requests mapped to each runtime's OpenAI dialect (node/gateway/dialect.py, runtimes' DIALECT)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest

import runtimes
from node.errors import InvalidRequest
from node.gateway.dialect import adapt
from runtimes import OPENAI, Dialect, SchemaOutput, llamacpp, ollama, vllm

TOOL_TURN = [{"role": "user", "content": "weather?"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
# llama-cpp-python 0.3's server, as seen by real clients (rejects content: null, ignores max_completion_tokens and n,
# takes a schema only inside json_object): the mapping is tested on this table whatever the default runtime is.
LLAMA_CPP_PYTHON = Dialect(tool_turn_content="", max_completion_tokens=False,
                           schema_output=SchemaOutput.JSON_OBJECT_SCHEMA, ignores={"n": 1})


def test_each_adapter_declares_its_dialect():
    spec = runtimes.WorkerSpec(model="m", replica=0, runtime="x", port=1, model_path=Path("/m.gguf"))
    # The llamacpp adapter's plan carries what the module declares (llama-server's own dialect is OpenAI's).
    assert llamacpp.plan(spec).dialect == getattr(llamacpp, "DIALECT", OPENAI) and not LLAMA_CPP_PYTHON.native
    assert vllm.plan(spec).dialect.native           # vLLM speaks OpenAI's dialect as is
    spec = replace(spec, source="ollama:tiny")
    assert ollama.plan(spec).dialect == ollama.DIALECT and ollama.DIALECT.ignores == {"n": 1}
    assert OPENAI.native and Dialect().native


def test_openai_dialect_changes_nothing():
    req = {"messages": copy.deepcopy(TOOL_TURN), "max_completion_tokens": 12, "n": 2,
           "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}
    before = copy.deepcopy(req)
    assert adapt(req, OPENAI) is False and req == before


@pytest.mark.parametrize("req, mapped", [
    # A tool-call-only assistant turn: the content the runtime accepts instead of null.
    ({"messages": TOOL_TURN}, {"messages": [TOOL_TURN[0], {**TOOL_TURN[1], "content": ""}, TOOL_TURN[2]]}),
    # max_completion_tokens is the limit the runtime honours under its older name.
    ({"max_completion_tokens": 12}, {"max_tokens": 12}),
    ({"max_completion_tokens": 12, "max_tokens": 5}, {"max_tokens": 5}),
    ({"max_completion_tokens": None}, {}),
    # json_schema as the grammar-backed json_object with a schema.
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     {"response_format": {"type": "json_object", "schema": SCHEMA}}),
    ({"n": 1}, {"n": 1}),
])
def test_llama_cpp_python_dialect(req, mapped):
    req = copy.deepcopy(req)
    changed = adapt(req, LLAMA_CPP_PYTHON)
    assert req == mapped
    assert changed == (mapped != {"n": 1})


@pytest.mark.parametrize("req, param", [
    ({"n": 2}, "n"),
    ({"n": "two"}, "n"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": "nope"}}, "response_format"),
])
def test_what_the_runtime_would_ignore_is_refused(req, param):
    with pytest.raises(InvalidRequest) as caught:
        adapt(req, LLAMA_CPP_PYTHON)
    assert caught.value.param == param and caught.value.status == 400 and param in caught.value.message


def test_text_and_json_object_pass_unchanged():
    for fmt in ({"type": "text"}, {"type": "json_object"}):
        req = {"response_format": dict(fmt)}
        assert adapt(req, Dialect(schema_output=SchemaOutput.JSON_OBJECT_SCHEMA)) is False
        assert req == {"response_format": fmt}


def test_large_conversations_are_mapped_in_linear_time():
    messages = [dict(TOOL_TURN[1]) for _ in range(100_000)]
    req = {"messages": messages}
    assert adapt(req, LLAMA_CPP_PYTHON) and all(m["content"] == "" for m in messages)
