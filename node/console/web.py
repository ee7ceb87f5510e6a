"""The console's HTTP side: sign-in and sign-out, page shells, static assets, API forwarding.

Every page is a shell rendered from templates/ (role-aware navigation, the session's CSRF
token in a meta tag) and one script from static/ that reads and changes the node through
`/ui/api/admin/v1/...` and `/ui/api/v1/...`. Those are forwarded to the admin API and the
gateway with the signed-in principal's secret in `Authorization`, so roles, quotas and
the audit log apply exactly as they do to the CLI and to clients; the console adds no
rights of its own. Writes need the session's CSRF token in `x-csrf-token`, and the
session cookie is HttpOnly, SameSite=Strict and, under TLS, Secure.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import jinja2

from node.accounts.pacing import FailurePacer
from node.console.sessions import Session, Sessions, SignedIn, csrf_ok

COOKIE = "infernode_session"
LOGIN_COOKIE = "infernode_login"      # the double-submit token of the sign-in form
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
# What docs/console.md promises of every console answer, its forwarded API answers included
# (node/gateway/dispatch.py puts these over whatever the admin API or the gateway said).
FORWARD_HEADERS = [*SECURITY_HEADERS, (b"cache-control", b"no-store")]
MAX_COOKIE_HEADER = 8192   # a longer Cookie header is not looked into
MAX_COOKIE_VALUE = 128     # our cookies' values are 43 characters; nothing longer is ours
HTML_CT = (b"content-type", b"text/html; charset=utf-8")
JSON_CT = (b"content-type", b"application/json")
STATIC_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8",
                ".svg": b"image/svg+xml", ".png": b"image/png", ".ico": b"image/x-icon"}
MAX_FORM_BYTES = 8192
SAFE_METHODS = {"GET", "HEAD"}


@dataclass(frozen=True, slots=True)
class Page:
    path: str
    title: str
    script: str
    roles: frozenset[str]     # who sees it: admin, operator, viewer, key


_STAFF = frozenset({"admin", "operator", "viewer"})
PAGES = [
    Page("/ui/", "Overview", "overview.js", _STAFF),
    Page("/ui/models", "Models", "models.js", _STAFF),
    Page("/ui/keys", "Keys", "keys.js", _STAFF),
    Page("/ui/teams", "Teams and plans", "teams.js", _STAFF),
    Page("/ui/usage", "Usage", "usage.js", _STAFF | {"key"}),
    Page("/ui/audit", "Audit", "audit.js", _STAFF),
    Page("/ui/batches", "Batches", "batches.js", _STAFF),
    Page("/ui/playground", "Playground", "playground.js", _STAFF | {"key"}),
]
_PAGE_BY_PATH = {p.path: p for p in PAGES}


@dataclass(slots=True)
class Answer:
    """A response the console gives itself."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


@dataclass(slots=True)
class Forward:
    """A console API call to pass on: the node's own path and the headers to send with it."""

    path: bytes
    headers: list[tuple[bytes, bytes]]


Identify = Callable[[str], "SignedIn | None"]


def _static_files() -> dict[str, bytes]:
    root = resources.files("node.console") / "static"
    return {f.name: f.read_bytes() for f in root.iterdir() if f.is_file()}


class Console:
    """Answers /ui/ itself, or says where a console API call goes (`Forward`)."""

    def __init__(self, identify: Identify, *, secure: bool, node_name: str, sessions: Sessions | None = None,
                 pacer: FailurePacer | None = None) -> None:
        self.identify = identify
        self.pacer = pacer if pacer is not None else FailurePacer()
        self.secure = secure
        self.node_name = node_name
        self.sessions = sessions if sessions is not None else Sessions()  # an empty one is falsy
        self._env = jinja2.Environment(loader=jinja2.PackageLoader("node.console", "templates"),
                                       autoescape=True, trim_blocks=True, lstrip_blocks=True)
        self._static = _static_files()   # a few small files, read once

    # -- the entry point -----------------------------------------------------
    def check_head(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[Answer | None, int]:
        """Before the body is read: refuse console API calls without a session; how many body bytes to allow."""
        if not path.startswith("/ui/api/"):
            return None, MAX_FORM_BYTES
        if self._session(_cookies(headers)) is None:
            return _json(401, {"error": {"message": "sign in first", "type": "authentication_error",
                                         "code": "not_signed_in"}}), 0
        # /v1 bodies (a playground chat) are bounded by the node's max_body_bytes, admin bodies by the admin API's.
        return None, (1 << 62) if path.startswith("/ui/api/v1/") else 0

    def handle(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
               client: str = "") -> Answer | Forward:
        """The answer to one /ui request, or where to forward it (`client`: the address, for pacing sign-ins)."""
        cookies = _cookies(headers)
        if path.startswith("/ui/static/"):
            return self._asset(path.removeprefix("/ui/static/"))
        if path == "/ui":
            return _redirect("/ui/")
        if path == "/ui/login":
            if method == "POST":
                return self._sign_in(cookies, body, client)
            return self._login_page("", 200)
        session = self._session(cookies)
        if path.startswith("/ui/api/"):
            return self._api(method, path, headers, session)
        if path == "/ui/logout":
            if method != "POST":
                return _json(405, {"error": {"message": "sign out with POST", "type": "invalid_request_error"}})
            form = _form(body)
            if session is None or not csrf_ok(session, form.get("csrf")):
                return _json(403, {"error": {"message": "missing or wrong CSRF token", "type": "permission_error",
                                             "code": "csrf_failed"}})
            self.sessions.close(cookies.get(COOKIE))
            return _redirect("/ui/login", [(b"set-cookie", self._cookie(COOKIE, "", max_age=0))])
        page = _PAGE_BY_PATH.get(path)
        if page is None:
            return Answer(404, [HTML_CT, *SECURITY_HEADERS], b"<!doctype html><title>Not found</title><p>Not found.")
        if session is None:
            return _redirect("/ui/login")
        if session.principal.role not in page.roles:
            return _redirect("/ui/usage")
        return self._page(page, session)

    def _session(self, cookies: dict[str, str]) -> Session | None:
        session = self.sessions.get(cookies.get(COOKIE))
        if session is not None and self.identify(session.principal.secret) != session.principal:
            # Revoked, expired or rotated away (or its role changed) since sign-in: the session ends with it.
            self.sessions.close(cookies.get(COOKIE))
            return None
        return session

    # -- sign-in ----------------------------------------------------------------
    def _login_page(self, message: str, status: int) -> Answer:
        token = secrets.token_urlsafe(24)
        html = self._env.get_template("login.html").render(csrf=token, message=message, node=self.node_name)
        return Answer(status, [HTML_CT, (b"cache-control", b"no-store"), *SECURITY_HEADERS,
                               (b"set-cookie", self._cookie(LOGIN_COOKIE, token, path="/ui/login"))], html.encode())

    def _sign_in(self, cookies: dict[str, str], body: bytes, client: str) -> Answer:
        if len(body) > MAX_FORM_BYTES:
            return self._login_page("That sign-in form is too large.", 413)
        wait = self.pacer.retry_after(client)
        if wait:   # before the token is looked at: guessing costs a guesser time, whatever it sends
            page = self._login_page(f"Too many failed sign-ins from this address; try again in {wait} s.", 429)
            page.headers.append((b"retry-after", str(wait).encode()))
            return page
        form = _form(body)
        expected = cookies.get(LOGIN_COOKIE, "")
        presented = form.get("csrf", "")
        if not expected or not hmac.compare_digest(expected.encode(), presented.encode()):
            return self._login_page("The sign-in form expired; please try again.", 403)
        secret = form.get("token", "").strip()
        principal = self.identify(secret) if secret else None
        if principal is None:
            self.pacer.failed(client)
            return self._login_page("That token or key is not valid here.", 401)
        session_id, session = self.sessions.open(principal)
        home = "/ui/" if principal.role != "key" else "/ui/usage"
        return _redirect(home, [(b"set-cookie", self._cookie(COOKIE, session_id)),
                                (b"set-cookie", self._cookie(LOGIN_COOKIE, "", path="/ui/login", max_age=0))])

    def _cookie(self, name: str, value: str, *, path: str = "/ui", max_age: int | None = None) -> bytes:
        parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts).encode()

    # -- pages and assets -------------------------------------------------------
    def _page(self, page: Page, session: Session) -> Answer:
        role = session.principal.role
        nav = [p for p in PAGES if role in p.roles]
        html = self._env.get_template("page.html").render(
            page=page, nav=nav, who=session.principal.public(), csrf=session.csrf, node=self.node_name)
        return Answer(200, [HTML_CT, (b"cache-control", b"no-store"), *SECURITY_HEADERS], html.encode())

    def _asset(self, name: str) -> Answer:
        data = self._static.get(name)
        ext = name[name.rfind("."):] if "." in name else ""
        if data is None or ext not in STATIC_TYPES:
            return Answer(404, [(b"content-type", b"text/plain"), *SECURITY_HEADERS], b"not found")
        return Answer(200, [(b"content-type", STATIC_TYPES[ext]), (b"cache-control", b"no-cache"),
                            *SECURITY_HEADERS], data)

    # -- the API, forwarded ------------------------------------------------------
    def _api(self, method: str, path: str, headers: list[tuple[bytes, bytes]], session: Session | None) -> Answer | Forward:
        if session is None:
            return _json(401, {"error": {"message": "sign in first", "type": "authentication_error",
                                         "code": "not_signed_in"}})
        if path == "/ui/api/session":
            return _json(200, {**session.principal.public(), "csrf": session.csrf})
        if method not in SAFE_METHODS and not csrf_ok(session, _header(headers, b"x-csrf-token")):
            return _json(403, {"error": {"message": "missing or wrong CSRF token", "type": "permission_error",
                                         "code": "csrf_failed"}})
        target = path.removeprefix("/ui/api")
        principal = session.principal
        if target.startswith("/admin/v1/"):
            if principal.kind != "admin":
                return _json(403, {"error": {"message": "an API key cannot use the admin API",
                                             "type": "permission_error", "code": "permission_denied"}})
            secret = principal.secret
        elif target.startswith("/v1/"):
            # An admin token is not an API key: the playground sends the key to use alongside.
            secret = principal.secret if principal.kind == "key" else (_header(headers, b"x-playground-key") or "")
        else:
            return _json(404, {"error": {"message": f"no console API {target}", "type": "invalid_request_error",
                                         "code": "not_found"}})
        kept = [(k, v) for k, v in headers
                if k not in (b"authorization", b"cookie", b"x-api-key", b"x-csrf-token", b"x-playground-key")]
        if secret:
            kept.append((b"authorization", b"Bearer " + secret.encode()))
        return Forward(target.encode(), kept)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def _cookies(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The console's own cookies only, by a plain split (linear; no http.cookies, whose parser is
    quadratic in backslashes on some Pythons); anything unusual is simply not ours."""
    jar: dict[str, str] = {}
    for k, v in headers:
        if k != b"cookie" or len(v) > MAX_COOKIE_HEADER:
            continue
        for part in v.split(b";"):
            name, eq, value = part.strip().partition(b"=")
            if eq and name in _OUR_COOKIES and len(value) <= MAX_COOKIE_VALUE:
                jar.setdefault(name.decode("ascii"), value.decode("latin-1"))
    return jar


_OUR_COOKIES = frozenset({COOKIE.encode(), LOGIN_COOKIE.encode()})


def _form(body: bytes) -> dict[str, str]:
    if len(body) > MAX_FORM_BYTES:
        return {}
    try:
        parsed = parse_qs(body.decode("utf-8"), max_num_fields=16, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in parsed.items()}


def _redirect(to: str, extra: list[tuple[bytes, bytes]] | None = None) -> Answer:
    return Answer(303, [(b"location", to.encode()), (b"cache-control", b"no-store"), *SECURITY_HEADERS,
                        *(extra or [])])


def _json(status: int, body: dict[str, Any]) -> Answer:
    return Answer(status, [JSON_CT, (b"cache-control", b"no-store"), *SECURITY_HEADERS], json.dumps(body).encode())


__all__ = ["FORWARD_HEADERS", "Answer", "Console", "Forward", "PAGES", "SignedIn"]
