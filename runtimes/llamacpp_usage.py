"""Launch shim: llama-cpp-python's OpenAI server, with exact usage at the end of every stream.

Run by the runtime's own interpreter in place of `python -m llama_cpp.server`:
`PY runtimes/llamacpp_usage.py -m llama_cpp.server ARGS...` (runtimes/llamacpp.py builds
that command; the node never imports this file). llama-cpp-python's streams carry no
usage: this shim counts, inside the server and at no cost, what its non-streamed
answers report — the prompt's tokens (the ids `Llama.generate` is handed) and the
completion's (every generated token but an end-of-generation one, which is what
`_create_completion` appends) — and sends them as a last OpenAI usage chunk
(`choices: []`, `usage`) before `[DONE]`. Nothing is read or held back from the stream.
If this llama-cpp-python lacks what the shim wraps, it says so and serves unpatched.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterator
from typing import Any


def patch() -> None:
    """Wrap Llama.generate, Llama._create_completion and the server's stream publisher."""
    import llama_cpp
    from llama_cpp.llama import Llama
    from llama_cpp.server import app

    generate, create, publish = Llama.generate, Llama._create_completion, app.get_event_publisher
    is_eog = llama_cpp.llama_vocab_is_eog

    def counted_generate(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Iterator[int]:
        counts = getattr(self, "_infernode_counts", None)
        if counts is None:
            yield from generate(self, tokens, *args, **kwargs)
            return
        counts[0] = len(tokens)
        for token in generate(self, tokens, *args, **kwargs):
            if not is_eog(self._model.vocab, token):
                counts[1] += 1
            yield token

    def counted_create(self: Any, *args: Any, **kwargs: Any) -> Any:
        inner = create(self, *args, **kwargs)
        if not kwargs.get("stream"):
            return inner

        def stream() -> Iterator[Any]:
            counts = [0, 0]
            self._infernode_counts = counts
            try:
                yield from inner
            finally:
                self._infernode_counts = None
            self._infernode_usage = {"prompt_tokens": counts[0], "completion_tokens": counts[1],
                                     "total_tokens": counts[0] + counts[1]}
        return stream()

    async def publisher(*args: Any, **kwargs: Any) -> Any:
        call = kwargs["llama_call"]

        def with_usage(llama: Any, **kw: Any) -> Iterator[Any]:
            last = None
            llama._infernode_usage = None
            for chunk in call(llama, **kw):
                last = chunk
                yield chunk
            usage = llama._infernode_usage
            if usage is not None and last is not None:
                yield {"id": last["id"], "object": last["object"], "created": last["created"],
                       "model": last["model"], "choices": [], "usage": usage}

        kwargs["llama_call"] = with_usage
        return await publish(*args, **kwargs)

    Llama.generate = counted_generate  # type: ignore[method-assign,assignment]
    Llama._create_completion = counted_create  # type: ignore[method-assign]
    app.get_event_publisher = publisher


def main(argv: list[str]) -> None:
    if argv[:2] != ["-m", "llama_cpp.server"]:
        sys.exit(f"usage: {sys.argv[0]} -m llama_cpp.server ARGS...")
    try:
        patch()
    except (ImportError, AttributeError) as exc:  # another llama-cpp-python: serve, without stream usage
        print(f"infernode: stream usage unavailable with this llama-cpp-python ({exc})", file=sys.stderr)
    sys.argv = ["llama_cpp.server", *argv[2:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
