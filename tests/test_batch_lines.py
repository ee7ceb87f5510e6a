"""The batch input check and the upload parser, in-process: tables of cases, hostile inputs, linear time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from node.batches import lines
from node.batches.api import multipart
from node.errors import InvalidRequest

URL = "/v1/chat/completions"


def line(cid="a", url=URL, method="POST", **body) -> dict:
    return {"custom_id": cid, "method": method, "url": url,
            "body": {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], **body}}


def write(tmp_path: Path, docs: list, raw: bytes = b"") -> Path:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"".join(json.dumps(d).encode() + b"\n" for d in docs) + raw)
    return p


def check(path: Path, limits=lines.Limits(), allowed=("tiny-chat",)) -> lines.Checked:
    return lines.check(path, URL, limits, lambda m: None if m in allowed else f"this API key may not use model '{m}'")


def test_a_good_file_counts_its_lines_and_models(tmp_path):
    out = check(write(tmp_path, [line("a"), line("b")], b"\n\n"))
    assert out.errors == [] and out.lines == 2 and out.models == {"tiny-chat"}
    assert [(x.index, x.custom_id) for x in lines.read(tmp_path / "in.jsonl")] == [(0, "a"), (1, "b")]


@pytest.mark.parametrize("raw, code, where", [
    (b"{not json\n", "invalid_json_line", 1),
    (b"[1, 2]\n", "invalid_json_line", 1),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny-chat"}}\xff\n',
     "invalid_json_line", 1),
    (json.dumps(line("\ud800")).encode() + b"\n", "invalid_custom_id", 1),
    (json.dumps(line("")).encode() + b"\n", "invalid_custom_id", 1),
    (json.dumps(line("x" * 513)).encode() + b"\n", "invalid_custom_id", 1),
    (json.dumps(line(url="/v1/embeddings")).encode() + b"\n", "mismatched_endpoint", 1),
    (json.dumps(line(method="GET")).encode() + b"\n", "invalid_method", 1),
    (json.dumps(line(stream=True)).encode() + b"\n", "invalid_body", 1),
    (json.dumps(line(model="other")).encode() + b"\n", "model_not_allowed", 1),
    (json.dumps({**line(), "body": "text"}).encode() + b"\n", "invalid_body", 1),
    (json.dumps(line()).encode() + b"\n" + json.dumps(line()).encode() + b"\n", "duplicate_custom_id", 2),
    (b"\n\n", "empty_file", None),
])
def test_bad_files_fail_with_openai_shaped_errors(tmp_path, raw, code, where):
    out = check(write(tmp_path, [], raw))
    assert out.errors, out
    err = out.errors[0]
    assert err["code"] == code and err["line"] == where and err["message"]


def test_limits_on_size_lines_and_line_length(tmp_path):
    p = write(tmp_path, [line(str(i)) for i in range(10)])
    assert check(p, lines.Limits(max_file_bytes=100)).errors[0]["code"] == "file_too_large"
    assert check(p, lines.Limits(max_lines=5)).errors[0] == {
        "code": "too_many_requests", "message": "a batch holds at most 5 requests", "param": None, "line": 6}
    assert check(p, lines.Limits(max_line_bytes=50)).errors[0]["code"] == "line_too_large"


def test_errors_listed_are_bounded(tmp_path):
    out = check(write(tmp_path, [], b"nope\n" * 5000))
    assert len(out.errors) == lines.MAX_ERRORS and out.lines == 5000


def _time(fn, *args) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        fn(*args)
        best = min(best, time.process_time() - t)
    return best


def test_the_check_is_linear_in_the_file(tmp_path):
    def run(n: int) -> float:
        p = tmp_path / f"f{n}.jsonl"
        p.write_bytes(b"".join(json.dumps(line(str(i))).encode() + b"\n" for i in range(n)))
        return _time(check, p, lines.Limits(max_lines=10**6))
    small, big = run(20_000), run(40_000)
    assert big <= 2.5 * small + 0.01, (small, big)


FORM = b"multipart/form-data; boundary=XyZ"


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += b"--XyZ\r\nContent-Disposition: " + disp.encode() + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--XyZ--\r\n"


def test_multipart_fields_and_file():
    body = form(("purpose", None, b"batch"), ("file", "in.jsonl", b'{"a": 1}\r\n{"b": 2}\n'))
    fields = multipart(body, FORM)
    assert fields == {"purpose": (None, b"batch"), "file": ("in.jsonl", b'{"a": 1}\r\n{"b": 2}\n')}


@pytest.mark.parametrize("body, ctype", [
    (b"", FORM),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nno end", FORM),
    (b"--XyZ\r\n" + b"h" * 10_000, FORM),
    (b"--XyZgarbage", FORM),
    (form(("file", "a", b"x")), b"application/json"),
    (form(("file", "a", b"x")), b"multipart/form-data"),
    (form(*[(f"f{i}", None, b"x") for i in range(20)]), FORM),
])
def test_multipart_refuses_malformed_bodies(body, ctype):
    with pytest.raises(InvalidRequest):
        multipart(body, ctype)


def test_multipart_is_linear():
    def body(n: int) -> bytes:
        return form(("file", "a", b"-" * n + b"\r\n--Xy" * (n // 8)))
    small, big = body(400_000), body(800_000)
    assert _time(multipart, big, FORM) <= 2.5 * _time(multipart, small, FORM) + 0.01
