"""Logs: JSON lines for journald, text on a terminal, an access line per request, never a secret or a prompt."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import uuid

import httpx
import pytest

from node.ops.logs import ACCESS_LOGGER, JsonFormatter, TextFormatter, access, redact, setup_logging
from tests.conftest import TINY_MODEL, start_node, write_config


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(ACCESS_LOGGER).disabled = False


def record(msg: str, *args, **extra) -> logging.LogRecord:
    r = logging.LogRecord("infernode.test", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_json_line_has_the_fields():
    line = JsonFormatter().format(record("worker %s answered %d", "tiny-0", 502, request_id="abc", model="tiny",
                                         key_id="key_1", status=502, latency_ms=12.5))
    obj = json.loads(line)
    assert obj["level"] == "warning" and obj["event"] == "worker tiny-0 answered 502" and obj["logger"] == "infernode.test"
    assert obj["request_id"] == "abc" and obj["model"] == "tiny" and obj["key_id"] == "key_1"
    assert obj["status"] == 502 and obj["latency_ms"] == 12.5
    assert obj["time"].endswith("Z") and "T" in obj["time"]


def test_secrets_are_masked_everywhere():
    secret = "sk-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"
    for text in (f"auth header Authorization: Bearer {secret}", f"key {secret} rejected", "password=hunter2hunter2",
                 f'master_key: "{secret}"'):
        assert secret not in redact(text) and "hunter2hunter2" not in redact(text)
    assert redact("5 tokens: done, prompt_tokens=5") == "5 tokens: done, prompt_tokens=5"
    assert redact(f"key {secret}") == "key sk-A1b2C3***"  # a prefix stays, to recognise the key
    try:
        raise ValueError(f"bad key {secret}")
    except ValueError:
        r = record("failed with %s", secret)
        r.exc_info = sys.exc_info()
    for fmt in (JsonFormatter(), TextFormatter()):
        assert secret not in fmt.format(r)


def test_text_on_a_terminal_json_otherwise(restore_logging, monkeypatch):
    master, slave = os.openpty()
    tty = os.fdopen(slave, "w")
    try:
        monkeypatch.setattr(sys, "stdout", tty)
        writer = setup_logging("auto")
        assert isinstance(writer.handlers[0].formatter, TextFormatter)
        writer.stop()
    finally:
        tty.close()
        os.close(master)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    writer = setup_logging("auto")
    assert isinstance(writer.handlers[0].formatter, JsonFormatter)
    access("rid-1", "tiny", "key_1", 200, 0.25, endpoint="chat", ttft_s=0.05, prompt_tokens=3, completion_tokens=4)
    logging.getLogger(ACCESS_LOGGER).disabled = True  # [node] access_log = false
    access("rid-2", "tiny", "key_1", 200, 0.25)
    writer.stop()  # lines are written by a background thread; stop() writes out what is queued
    lines = [json.loads(ln) for ln in sys.stdout.getvalue().splitlines()]
    assert [ln["request_id"] for ln in lines] == ["rid-1"]
    assert lines[0] | {"time": None} == {"time": None, "level": "info", "logger": ACCESS_LOGGER, "event": "request",
                                         "request_id": "rid-1", "model": "tiny", "key_id": "key_1", "status": 200,
                                         "latency_ms": 250.0, "ttft_ms": 50.0, "prompt_tokens": 3,
                                         "completion_tokens": 4, "endpoint": "chat"}


def test_text_lines_escape_control_characters(restore_logging, monkeypatch):
    """A client's words (model names, request ids) cannot forge a text log line or drive the terminal."""
    hostile = "m\r\n12:00:00 INFO    infernode.node: forged\x1b[2J\x00\x85"
    line = TextFormatter().format(record("model %s not found", hostile, model=hostile, request_id="r\n1"))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x00" not in line and "\x85" not in line
    assert "m\\r\\n12:00:00 INFO    infernode.node: forged\\x1b[2J\\x00\\x85 not found" in line
    assert "request_id=r\\n1" in line
    try:
        raise ValueError("bad\x1b[31m")
    except ValueError:
        rec = logging.LogRecord("infernode.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = TextFormatter().format(rec)
    assert text.splitlines()[1] == "Traceback (most recent call last):" and "ValueError: bad\\x1b[31m" in text
    # Access lines, written by the background thread in text format, too.
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    writer = setup_logging("text")
    access("rid\x1b]0;owned\x07", hostile, "key_1", 404, 0.01, endpoint="chat")
    writer.stop()
    [access_line] = out.getvalue().splitlines()
    assert "\x1b" not in access_line and "request_id=rid\\x1b]0;owned\\x07" in access_line
    assert "model=m\\r\\n12:00:00" in access_line


def test_node_logs_json_access_lines_without_prompt_or_secret(tiny_node):
    key = tiny_node.create_key()
    prompt = "PROMPT-MUST-NOT-BE-LOGGED-7f3a"
    rid = f"trace-{uuid.uuid4().hex[:12]}"  # any shape reaches llama-server unchanged (no UUID needed)
    r = httpx.post(tiny_node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}", "x-request-id": rid},
                   json={"model": "tiny-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    bad = httpx.post(tiny_node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}x"},
                     json={"model": "tiny-chat", "messages": [{"role": "user", "content": prompt}]}, timeout=30)
    assert bad.status_code == 401
    tiny_node.stop()
    text = tiny_node.log.read_text()
    lines = [json.loads(ln) for ln in text.splitlines() if ln.strip()]  # every line is JSON (stdout is not a tty)
    [line] = [ln for ln in lines if ln.get("request_id") == rid and ln["logger"] == ACCESS_LOGGER]
    assert line["model"] == "tiny-chat" and line["status"] == 200 and line["latency_ms"] > 0
    assert line["key_id"].startswith("key_") and line["completion_tokens"] == 3
    assert prompt not in text
    assert key not in text and key[:12] not in text and tiny_node.admin_key not in text


def test_prompts_are_logged_only_when_switched_on(tiny_node, tmp_path):
    cfg = write_config(tmp_path, TINY_MODEL)
    cfg.write_text(cfg.read_text().replace('name = "test-node"', 'name = "test-node"\nlog_prompts = true'))
    node_on = start_node(cfg)
    try:
        node_on.wait_ready()
        prompt = "PROMPT-LOGGED-ON-PURPOSE-51c2"
        for n in (tiny_node, node_on):
            key = n.create_key()
            r = httpx.post(n.url + "/v1/chat/completions",
                           headers={"authorization": f"Bearer {key}", "x-request-id": str(uuid.uuid4())},
                           json={"model": "tiny-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 200, r.text
            n.stop()
    finally:
        node_on.stop()
    assert prompt not in tiny_node.log.read_text()
    lines = [json.loads(ln) for ln in node_on.log.read_text().splitlines() if ln.strip()]
    [line] = [ln for ln in lines if ln.get("prompt")]
    assert prompt in line["prompt"] and line["model"] == "tiny-chat"
