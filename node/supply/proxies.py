"""Which proxy a URL goes through, by the environment curl and httpx read, with its credentials.

`HTTPS_PROXY` / `HTTP_PROXY` (then `ALL_PROXY`; lower case wins, as in curl) name an
`http://[user:password@]host:port` proxy; the user and password become a
`Proxy-Authorization: Basic` header, on the CONNECT of an https tunnel or on each
plain-http request. `NO_PROXY` is a comma list: `*` (no proxy at all), a host or
domain (`example.com` also covers `www.example.com`; a leading `.` or `*.` is the same),
`host:port` (that port only), or an IP address or CIDR block.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


class ProxyConfigError(ValueError):
    """A proxy variable that cannot be used as written."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value, when the URL has credentials

    def __repr__(self) -> str:  # never print the credentials
        return f"Proxy({self.host}:{self.port}{', with credentials' if self.authorization else ''})"


def _env(*names: str) -> tuple[str, str]:
    """(the variable that is set, its value), lower case first; ("", "") when none is."""
    for name in names:
        for v in (name.lower(), name.upper()):
            if os.environ.get(v):
                return v, os.environ[v]
    return "", ""


def parse_proxy(value: str, variable: str) -> Proxy:
    """`http://user:pass@host:port` (scheme optional) -> Proxy; https:// proxies are refused."""
    u = urlsplit(value if "://" in value else f"http://{value}")
    if u.scheme != "http":
        raise ProxyConfigError(f"{variable}: only http:// proxies are supported (https is tunnelled through them), not {u.scheme}://")
    try:
        port = u.port or 80
    except ValueError:
        raise ProxyConfigError(f"{variable}: bad port in the proxy URL") from None
    if not u.hostname:
        raise ProxyConfigError(f"{variable}: no host in the proxy URL")
    auth = None
    if u.username is not None:
        cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
        auth = "Basic " + base64.b64encode(cred).decode()
    return Proxy(u.hostname, port, auth)


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether NO_PROXY exempts host:port (see the module docstring for the forms)."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        want_port = None
        if entry.startswith("["):  # [v6]:port
            name, _, rest = entry[1:].partition("]")
            entry, want_port = name, rest.removeprefix(":") or None
        elif entry.count(":") == 1:
            entry, want_port = entry.split(":")
        if want_port is not None and want_port != str(port):
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.removeprefix("*").removeprefix(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def proxy_for(scheme: str, host: str, port: int) -> Proxy | None:
    """The proxy for a request to scheme://host:port, or None to connect directly."""
    variable, value = _env("https_proxy" if scheme == "https" else "http_proxy", "all_proxy")
    if not value or bypassed(host, port, _env("no_proxy")[1]):
        return None
    return parse_proxy(value, variable)
