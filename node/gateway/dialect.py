"""A chat or completions request mapped to its runtime's dialect (runtimes.Dialect), before it is sent.

The translators and OpenAI clients speak OpenAI's dialect; a runtime that differs says
how in its adapter, and this maps the few fields concerned, or refuses with a 400
naming the field what the runtime would silently ignore. Work is linear in the
number of messages and only done for runtimes whose dialect is not OpenAI's.
"""

from __future__ import annotations

from typing import Any

from node.errors import InvalidRequest
from runtimes import Dialect, SchemaOutput


def adapt(req: dict[str, Any], dialect: Dialect) -> bool:
    """Map `req` (an OpenAI chat or completions body) in place; True when anything changed."""
    changed = False
    for name, default in dialect.ignores.items():
        value = req.get(name)
        if value is not None and value != default:
            raise InvalidRequest(f"'{name}' must be {default!r} (or left out) for this model: its runtime "
                                 f"ignores it", param=name, code="unsupported_parameter")
    if not dialect.max_completion_tokens and "max_completion_tokens" in req:
        limit = req.pop("max_completion_tokens")
        if limit is not None and req.get("max_tokens") is None:
            req["max_tokens"] = limit  # OpenAI: the newer name of the same limit
        changed = True
    if dialect.tool_turn_content is not None:
        messages = req.get("messages")
        if isinstance(messages, list):
            for msg in messages:
                if isinstance(msg, dict) and msg.get("content") is None and msg.get("role") == "assistant":
                    msg["content"] = dialect.tool_turn_content
                    changed = True
    if dialect.schema_output is SchemaOutput.JSON_OBJECT_SCHEMA:
        fmt = req.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequest("'response_format.json_schema.schema' must be a JSON schema object",
                                     param="response_format")
            req["response_format"] = {"type": "json_object", "schema": schema}
            changed = True
    return changed
