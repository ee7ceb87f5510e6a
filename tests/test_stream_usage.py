"""Exact usage: a streamed request reports the same tokens as the same request not streamed, on every API.

Against a real llama-server worker (its streams end with its own usage chunk when the node
asks with stream_options.include_usage), greedy so that both answers are the same, with a
stop sequence and non-ASCII text, where counting streamed chunks would be wrong.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

PROMPT = "Écris « bonjour » en japonais: こんにちは, puis compte: un, deux, trois."
SAMPLING = {"top_k": 1, "temperature": 0, "seed": 3}


def ledger(node) -> list[dict]:
    with node.admin() as c:
        return c.get("/admin/v1/usage", params={"group_by": "api,model"}).json()["data"]


@pytest.mark.parametrize("max_tokens,stop", [(24, None), (40, ["trois"]), (3, None)])
def test_openai_chat_and_completions(api_node, max_tokens, stop):
    node, _, key = api_node
    c = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)
    msgs = [{"role": "user", "content": PROMPT}]
    extra = {"top_k": 1, "seed": 3}
    whole = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=max_tokens, stop=stop,
                                      temperature=0, extra_body=extra)
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=max_tokens, stop=stop,
                                            temperature=0, extra_body=extra, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    comp = c.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=max_tokens, stop=stop, temperature=0,
                                extra_body=extra)
    parts = list(c.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=max_tokens, stop=stop,
                                      temperature=0, extra_body=extra, stream=True,
                                      stream_options={"include_usage": True}))
    assert (parts[-1].usage.prompt_tokens, parts[-1].usage.completion_tokens) == \
        (comp.usage.prompt_tokens, comp.usage.completion_tokens)


def test_every_translated_api(api_node):
    node, _, key = api_node
    a = anthropic.Anthropic(base_url=node.url, api_key=key, max_retries=0)
    args = dict(model="tiny-chat", max_tokens=30, messages=[{"role": "user", "content": PROMPT}], extra_body=SAMPLING)
    whole = a.messages.create(**args)
    with a.messages.stream(**args) as s:
        final = s.get_final_message()
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens, whole.usage.output_tokens)

    o = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)
    rargs = dict(model="tiny-chat", input=PROMPT, max_output_tokens=30, temperature=0, extra_body={"top_k": 1, "seed": 3})
    r = o.responses.create(**rargs)
    last = list(o.responses.create(**rargs, stream=True))[-1].response
    assert (last.usage.input_tokens, last.usage.output_tokens) == (r.usage.input_tokens, r.usage.output_tokens)

    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": PROMPT}],
            "options": {"num_predict": 30, **SAMPLING}}
    h = {"authorization": f"Bearer {key}"}
    one = httpx.post(node.url + "/api/chat", json={**body, "stream": False}, headers=h, timeout=60).json()
    lines = [json.loads(x) for x in httpx.post(node.url + "/api/chat", json=body, headers=h, timeout=60).text.splitlines()]
    assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (one["prompt_eval_count"], one["eval_count"])
