"""Context honesty: refuse, with a clear 400, a request that certainly cannot fit the model's context.

The node has no tokenizer on the hot path, so it only rejects what is certain:
- `max_tokens` (or `max_completion_tokens`) alone larger than the context;
- a prompt given as token ids (completions) whose length plus `max_tokens` exceeds it;
- a text prompt whose *lower bound* in tokens plus `max_tokens` exceeds it. The bound is
  the prompt's UTF-8 bytes, with runs of one repeated character counted once, divided
  by MAX_BYTES_PER_TOKEN (no common tokenizer has ordinary tokens longer than that;
  runs of one character, which some vocabularies do merge into long tokens, are why
  runs count once). Anything less certain goes to the worker, which enforces its
  own limit and whose 400 is passed through;
- a chat whose messages alone, at MESSAGE_TOKENS each (what every chat template adds
  around a message at the least: a role marker and an end-of-turn mark), plus
  `max_tokens` exceed it: 32,000 empty messages are refused here, not ground through
  by the worker's template and tokenizer.

The work is bounded whatever the body: the run-collapsed length is counted without a
regex (byte-wise XOR of the text and itself shifted by one, in C) over at most
SCAN_BYTES of prompt text, a prefix whose count is still a lower bound of the whole's.
Fields of the wrong type are a 400 naming them.
"""

from __future__ import annotations

from typing import Any

from node.errors import InvalidRequest

MAX_BYTES_PER_TOKEN = 32
MESSAGE_TOKENS = 3  # template tokens per chat message, a floor (ChatML, Llama 3 and Gemma add 5 or more)
SCAN_BYTES = 512 << 10  # prompt bytes looked at per request at most (~2.5 ms of CPU in the worst case)


def collapsed_len(t: bytes) -> int:
    """len(t) with every run of one repeated byte counted once (what re.sub(rb"(.)\\1+", rb"\\1", t) leaves)."""
    n = len(t) - 1
    if n < 1:
        return len(t)
    same = (int.from_bytes(t[1:], "little") ^ int.from_bytes(t[:-1], "little")).to_bytes(n, "little").count(0)
    return 1 + n - same


def check(req: dict[str, Any], endpoint: str, context_len: int | None) -> None:
    """Raise InvalidRequest when prompt + max_tokens certainly exceed context_len."""
    if not context_len:
        return
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        max_tokens = 0
    param = "max_completion_tokens" if "max_completion_tokens" in req else "max_tokens"
    if max_tokens > context_len:
        raise InvalidRequest(
            f"{param} is {max_tokens}, but this model's context is {context_len} tokens; "
            f"ask for at most {context_len} tokens, prompt included", param=param, code="context_length_exceeded")
    if endpoint == "chat":
        messages = req.get("messages")
        count = len(messages) if isinstance(messages, list) else 0
        if count * MESSAGE_TOKENS + max_tokens > context_len:  # before any walk of the messages
            raise InvalidRequest(
                f"the request has {count} messages, at least {count * MESSAGE_TOKENS} tokens of chat template, "
                f"and {param} is {max_tokens}: together more than this model's context of {context_len} tokens",
                param="messages", code="context_length_exceeded")
    ids, texts = _prompt(req, endpoint)
    if ids + max_tokens > context_len:
        raise InvalidRequest(
            f"the prompt has {ids} tokens and {param} is {max_tokens}: together more than this model's "
            f"context of {context_len} tokens", param="prompt", code="context_length_exceeded")
    size = sum(len(t) for t in texts)
    # Cheap test first; the exact lower bound only when the cheap one says it may not fit.
    if ids + size // MAX_BYTES_PER_TOKEN + max_tokens <= context_len:
        return
    budget, collapsed = SCAN_BYTES, 0
    for t in texts:
        if budget <= 0:
            break
        collapsed += collapsed_len(t[:budget])  # a prefix collapses to no more than the whole
        budget -= len(t)
    low = ids + collapsed // MAX_BYTES_PER_TOKEN
    if low + max_tokens > context_len:
        raise InvalidRequest(
            f"the prompt is at least {low} tokens long and {param} is {max_tokens}: together more than this "
            f"model's context of {context_len} tokens; shorten the prompt or lower {param}",
            param="messages" if endpoint == "chat" else "prompt", code="context_length_exceeded")


def _prompt(req: dict[str, Any], endpoint: str) -> tuple[int, list[bytes]]:
    """(token ids given as ids, prompt texts as UTF-8)."""
    texts: list[bytes] = []
    ids = 0
    if endpoint == "chat":
        messages = req.get("messages")
        if messages is not None and not isinstance(messages, list):
            raise InvalidRequest("'messages' must be an array of message objects", param="messages")
        for msg in messages or ():
            if not isinstance(msg, dict):
                continue
            content = msg.get("content")
            if isinstance(content, str):
                texts.append(_utf8(content))
            elif isinstance(content, list):
                texts += [_utf8(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return len(messages or ()) * MESSAGE_TOKENS, texts
    prompt = req.get("prompt")
    if isinstance(prompt, str):
        texts.append(_utf8(prompt))
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            ids = len(prompt)
        else:  # a batch: each prompt must fit on its own, so the longest one decides
            longest_ids = max((len(p) for p in prompt if isinstance(p, list)), default=0)
            strs = [_utf8(p) for p in prompt if isinstance(p, str)]
            if strs:  # checking the longest text alone stays a lower bound for a mixed batch
                texts.append(max(strs, key=len))
            else:
                ids = longest_ids
    return ids, texts


def _utf8(text: str) -> bytes:
    """UTF-8 of a JSON string; a lone surrogate ("\\ud800", valid JSON) takes its 3 bytes rather than failing."""
    return text.encode("utf-8", "surrogatepass")
