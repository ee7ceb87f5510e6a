"""The console's HTTP side without a browser: sessions, sign-in, CSRF, cookies, forwarding, headers."""

from __future__ import annotations

import re

import pytest

from node.console.sessions import Sessions, SignedIn, csrf_ok
from node.console.web import CSP, Answer, Console, Forward

ADMIN = SignedIn("admin", "admin", "admin", "admin key", None, "sk-admin-secret")
KEY = SignedIn("key", "key", "key_1", "alice", "research", "sk-user-secret")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


VALID = {"sk-admin-secret": ADMIN, "sk-user-secret": KEY}


def identify(secret: str) -> SignedIn | None:
    return VALID.get(secret)


def console(secure: bool = False, **kw) -> Console:
    return Console(identify, secure=secure, node_name="box", **kw)


def header(a: Answer, name: bytes) -> list[bytes]:
    return [v for k, v in a.headers if k == name]


def sign_in(c: Console, token: str) -> tuple[Answer, str | None]:
    """GET the form, POST it back with its double-submit token; the session cookie, if any."""
    form = c.handle("GET", "/ui/login", [], b"")
    login_cookie = header(form, b"set-cookie")[0].split(b";")[0].decode()
    csrf = re.search(rb'name="csrf" value="([^"]+)"', form.body).group(1).decode()
    body = f"csrf={csrf}&token={token}".encode()
    a = c.handle("POST", "/ui/login", [(b"cookie", login_cookie.encode())], body)
    for v in header(a, b"set-cookie"):
        if v.startswith(b"infernode_session=") and b"Max-Age=0" not in v:
            return a, v.split(b";")[0].decode()
    return a, None


def test_sessions_expire_when_idle_or_old_and_are_bounded():
    clock = Clock()
    s = Sessions(idle_s=10, max_age_s=100, max_sessions=3, clock=clock)
    sid, session = s.open(ADMIN)
    assert s.get(sid) is session
    clock.t += 9
    assert s.get(sid) is session          # seen again: the idle timer restarts
    clock.t += 11
    assert s.get(sid) is None             # idle too long
    sid, _ = s.open(ADMIN)
    for _ in range(12):
        clock.t += 9
        s.get(sid)
    assert s.get(sid) is None             # never idle, but older than max_age_s
    ids = [s.open(KEY)[0] for _ in range(5)]
    assert len(s) == 3 and s.get(ids[0]) is None and s.get(ids[-1]) is not None
    assert s.get("x" * 500) is None and s.get("") is None and s.get(None) is None


def test_csrf_is_compared_whole():
    _, session = Sessions().open(ADMIN)
    assert csrf_ok(session, session.csrf)
    assert not csrf_ok(session, session.csrf[:-1]) and not csrf_ok(session, "") and not csrf_ok(session, None)


def test_close_principal_ends_its_sessions_only():
    s = Sessions()
    a, _ = s.open(KEY)
    b, _ = s.open(ADMIN)
    assert s.close_principal(KEY.id) == 1
    assert s.get(a) is None and s.get(b) is not None


def test_sign_in_sets_a_strict_httponly_cookie_and_secure_under_tls():
    for secure in (False, True):
        a, cookie = sign_in(console(secure=secure), "sk-admin-secret")
        assert a.status == 303 and header(a, b"location") == [b"/ui/"]
        set_cookie = [v for v in header(a, b"set-cookie") if v.startswith(b"infernode_session=")][0]
        assert b"HttpOnly" in set_cookie and b"SameSite=Strict" in set_cookie and b"Path=/ui" in set_cookie
        assert (b"Secure" in set_cookie) is secure
        assert cookie and "sk-admin-secret" not in cookie


def test_sign_in_refuses_a_bad_token_a_missing_form_token_and_a_huge_form():
    c = console()
    a, cookie = sign_in(c, "sk-wrong")
    assert a.status == 401 and cookie is None and b"not valid" in a.body
    # A form posted without its double-submit token (e.g. from another site): refused.
    a = c.handle("POST", "/ui/login", [], b"csrf=x&token=sk-admin-secret")
    assert a.status == 403 and not [v for v in header(a, b"set-cookie") if v.startswith(b"infernode_session=")]
    a = c.handle("POST", "/ui/login", [(b"cookie", b"infernode_login=x")], b"csrf=x&token=" + b"a" * 20000)
    assert a.status == 413
    # Garbage of every kind is a 4xx page, never an exception.
    for body in (b"\xff\xfe", b"%%%", b"csrf=&token=", b"token=a&token=b&" * 100):
        assert 400 <= c.handle("POST", "/ui/login", [(b"cookie", b"\xff; ;;=")], body).status < 500


def test_user_key_home_is_its_usage_and_staff_pages_redirect_there():
    c = console()
    a, cookie = sign_in(c, "sk-user-secret")
    assert header(a, b"location") == [b"/ui/usage"]
    h = [(b"cookie", cookie.encode())]
    assert header(c.handle("GET", "/ui/keys", h, b""), b"location") == [b"/ui/usage"]
    page = c.handle("GET", "/ui/usage", h, b"")
    assert page.status == 200 and b"Playground" in page.body and b"/ui/keys" not in page.body


def test_pages_need_a_session_and_carry_a_strict_csp():
    c = console()
    a = c.handle("GET", "/ui/", [], b"")
    assert a.status == 303 and header(a, b"location") == [b"/ui/login"]
    _, cookie = sign_in(c, "sk-admin-secret")
    page = c.handle("GET", "/ui/", [(b"cookie", cookie.encode())], b"")
    assert page.status == 200 and header(page, b"content-security-policy") == [CSP]
    assert b"'unsafe-inline'" not in CSP and b"script-src 'self'" in CSP
    assert b"<script>" not in page.body and re.search(rb"<script[^>]*src=", page.body)   # no inline scripts
    assert header(page, b"x-frame-options") == [b"DENY"]


def test_api_calls_are_forwarded_with_the_secret_and_writes_need_csrf():
    c = console()
    _, cookie = sign_in(c, "sk-admin-secret")
    session = c.sessions.get(cookie.split("=", 1)[1])
    h = [(b"cookie", cookie.encode()), (b"authorization", b"Bearer forged"), (b"content-type", b"application/json")]
    fwd = c.handle("GET", "/ui/api/admin/v1/keys", h, b"")
    assert isinstance(fwd, Forward) and fwd.path == b"/admin/v1/keys"
    assert (b"authorization", b"Bearer sk-admin-secret") in fwd.headers
    assert not [v for k, v in fwd.headers if k in (b"cookie",) or v == b"Bearer forged"]
    refused = c.handle("POST", "/ui/api/admin/v1/keys", h, b"{}")
    assert isinstance(refused, Answer) and refused.status == 403 and b"csrf_failed" in refused.body
    ok = c.handle("POST", "/ui/api/admin/v1/keys", h + [(b"x-csrf-token", session.csrf.encode())], b"{}")
    assert isinstance(ok, Forward)
    # Only /v1 and /admin/v1 can be reached through the console.
    assert c.handle("GET", "/ui/api/metrics", h, b"").status == 404


def test_a_key_session_reaches_v1_with_its_key_but_never_the_admin_api():
    c = console()
    _, cookie = sign_in(c, "sk-user-secret")
    h = [(b"cookie", cookie.encode())]
    fwd = c.handle("GET", "/ui/api/v1/me", h, b"")
    assert isinstance(fwd, Forward) and (b"authorization", b"Bearer sk-user-secret") in fwd.headers
    a = c.handle("GET", "/ui/api/admin/v1/keys", h, b"")
    assert a.status == 403 and b"permission_denied" in a.body


def test_sign_out_needs_post_and_csrf_and_ends_the_session():
    c = console()
    _, cookie = sign_in(c, "sk-admin-secret")
    sid = cookie.split("=", 1)[1]
    csrf = c.sessions.get(sid).csrf
    h = [(b"cookie", cookie.encode())]
    assert c.handle("GET", "/ui/logout", h, b"").status == 405
    assert c.handle("POST", "/ui/logout", h, b"csrf=wrong").status == 403
    a = c.handle("POST", "/ui/logout", h, f"csrf={csrf}".encode())
    assert a.status == 303 and c.sessions.get(sid) is None
    assert c.handle("GET", "/ui/api/session", h, b"").status == 401


@pytest.mark.parametrize("name", ["../web.py", "..%2fweb.py", "console.css/../x", "nope.js", "sessions.py", ""])
def test_static_serves_only_its_own_files(name):
    assert console().handle("GET", "/ui/static/" + name, [], b"").status == 404


def test_static_assets_have_their_types():
    c = console()
    for name, ct in (("console.css", b"text/css"), ("api.js", b"text/javascript")):
        a = c.handle("GET", f"/ui/static/{name}", [], b"")
        assert a.status == 200 and header(a, b"content-type")[0].startswith(ct) and a.body


def test_a_session_ends_when_its_key_is_revoked(monkeypatch):
    c = console()
    _, cookie = sign_in(c, "sk-user-secret")
    h = [(b"cookie", cookie.encode())]
    assert c.handle("GET", "/ui/usage", h, b"").status == 200
    monkeypatch.delitem(VALID, "sk-user-secret")           # revoked on the node
    assert c.handle("GET", "/ui/api/v1/me", h, b"").status == 401
    assert header(c.handle("GET", "/ui/usage", h, b""), b"location") == [b"/ui/login"]
    assert len(c.sessions) == 0


def test_the_head_check_refuses_api_calls_without_a_session_and_bounds_bodies():
    c = console()
    refused, _ = c.check_head("POST", "/ui/api/admin/v1/keys", [])
    assert refused is not None and refused.status == 401
    refused, limit = c.check_head("POST", "/ui/login", [])
    assert refused is None and limit == 8192
    _, cookie = sign_in(c, "sk-admin-secret")
    h = [(b"cookie", cookie.encode())]
    refused, limit = c.check_head("POST", "/ui/api/admin/v1/keys", h)
    assert refused is None and limit == 0               # 0: the admin API's own bound applies
    refused, limit = c.check_head("POST", "/ui/api/v1/chat/completions", h)
    assert refused is None and limit > 1 << 30          # the node's max_body_bytes applies


def test_only_our_cookies_are_read_and_in_linear_time():
    """Seven 8 KiB headers of backslashes took http.cookies 1.1 s; a plain split is linear in them."""
    import time

    from node.console.web import _cookies
    c = console()
    _, cookie = sign_in(c, "sk-admin-secret")

    def cost(n: int) -> float:
        junk = [(b"cookie", b'a="' + b"\\" * n + b'"; b=' + b"\\;" * (n // 4)) for _ in range(7)]
        t = time.perf_counter()
        for _ in range(20):
            _cookies(junk + [(b"cookie", cookie.encode())])
        return time.perf_counter() - t

    small, big = min(cost(4000) for _ in range(3)), min(cost(8000) for _ in range(3))
    assert big < 2.5 * small + 0.002 and big < 0.05, (small, big)
    h = [(b"cookie", b'x="\\\\\\\\"; ' + cookie.encode() + b"; y=" + b"z" * 5000)]
    assert c.handle("GET", "/ui/api/session", h, b"").status == 200      # ours found among junk
    too_long = [(b"cookie", cookie.encode() + b"x" * 200)]
    assert c.handle("GET", "/ui/api/session", too_long, b"").status == 401
    assert _cookies([(b"cookie", b"infernode_session=" + b"a" * 129)]) == {}
    assert _cookies([(b"cookie", b"other=1; infernode_login=tok")]) == {"infernode_login": "tok"}


def test_one_principal_cannot_evict_the_sessions_of_others():
    """10,052 sign-ins with one API key: its own oldest sessions go, every admin's stay."""
    from node.console.sessions import MAX_PER_PRINCIPAL
    s = Sessions(max_sessions=10_000)
    admin_sid, _ = s.open(ADMIN)
    other = SignedIn("key", "key", "key_2", "bob", None, "sk-bob")
    bob_sid, _ = s.open(other)
    mine = [s.open(KEY)[0] for _ in range(10_052)]
    assert s.get(admin_sid) is not None and s.get(bob_sid) is not None
    assert len(s) == 2 + MAX_PER_PRINCIPAL
    assert s.get(mine[-1]) is not None and s.get(mine[0]) is None
    assert s.close_principal("key_1") == MAX_PER_PRINCIPAL and len(s) == 2
    # a full table: keys' sign-ins evict the oldest key session, never an admin token's
    small = Sessions(max_sessions=3)
    a, _ = small.open(ADMIN)
    for i in range(10):
        small.open(SignedIn("key", "key", f"key_{i}", "k", None, "s"))
    assert small.get(a) is not None and len(small) == 3


def test_console_sign_in_is_paced_per_address():
    from node.accounts.pacing import FailurePacer
    clock = Clock()
    c = console(pacer=FailurePacer(per_minute=20, burst=20, clock=clock))

    def attempt(token: str, client: str) -> Answer:
        form = c.handle("GET", "/ui/login", [], b"")
        login_cookie = header(form, b"set-cookie")[0].split(b";")[0]
        csrf = re.search(rb'name="csrf" value="([^"]+)"', form.body).group(1).decode()
        return c.handle("POST", "/ui/login", [(b"cookie", login_cookie)], f"csrf={csrf}&token={token}".encode(),
                        client=client)

    statuses = [attempt(f"guess{i}", "10.0.0.9").status for i in range(22)]
    assert statuses[:20] == [401] * 20 and statuses[20:] == [429, 429]
    refused = attempt("sk-admin-secret", "10.0.0.9")
    assert refused.status == 429 and header(refused, b"retry-after") == [b"3"]   # 20/min: one try per 3 s
    assert attempt("sk-admin-secret", "10.0.0.10").status == 303                # another address signs in
    clock.t += 3
    assert attempt("sk-admin-secret", "10.0.0.9").status == 303                 # the bucket refills
