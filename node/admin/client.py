"""A client of the running node's admin API, for the CLI."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from typing import Any

import httpx

from node.config import Config
from node.errors import NodeError, OperationFailed


class AdminClient:
    def __init__(self, config: Config, *, timeout: float = 30.0) -> None:
        host = config.node.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        self.base = f"{config.node.scheme}://{host}:{config.node.port}"
        key = config.admin_key()
        if not key:
            raise OperationFailed(
                f"no admin key: set ${config.node.admin_key_env} or create {config.admin_key_path} "
                "(the node writes one there on first start)"
            )
        self._http = httpx.Client(base_url=self.base, headers={"authorization": f"Bearer {key}"}, timeout=timeout,
                                  verify=node_tls(config) if config.node.tls_cert else True)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.ConnectError:
            raise OperationFailed(f"no node is answering at {self.base}; start it with `infernode up` (or systemctl start infernode)") from None
        except httpx.HTTPError as exc:
            raise OperationFailed(f"talking to the node at {self.base} failed: {exc}") from None
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:300]
            err = NodeError(f"the node answered {r.status_code}: {msg}")
            err.status = r.status_code
            raise err
        return r.json()

    def stream(self, path: str, **kw: Any) -> Iterator[bytes]:
        """A GET whose answer is copied through as it arrives (for exports too big to hold)."""
        try:
            with self._http.stream("GET", path, **kw) as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        msg = r.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        msg = r.text[:300]
                    err = NodeError(f"the node answered {r.status_code}: {msg}")
                    err.status = r.status_code
                    raise err
                yield from r.iter_bytes()
        except httpx.ConnectError:
            raise OperationFailed(f"no node is answering at {self.base}; start it with `infernode up` (or systemctl start infernode)") from None
        except httpx.HTTPError as exc:
            raise OperationFailed(f"talking to the node at {self.base} failed: {exc}") from None

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def get_all(self, path: str, params: dict[str, Any] | None = None, *, page: int = 1000) -> tuple[dict[str, Any], list[Any]]:
        """Every row of a paged admin list, a page at a time: (the first page's answer, all rows)."""
        params = dict(params or {})
        first: dict[str, Any] | None = None
        rows: list[Any] = []
        while True:
            data = self.get(path, params={**params, "limit": page, "offset": len(rows)})
            first = first or data
            rows += data["data"]
            if not data.get("has_more") or not data["data"]:
                return first, rows

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self.request("PATCH", path, **kw)


CLIENT_CERT_ENV, CLIENT_KEY_ENV = "INFERNODE_TLS_CLIENT_CERT", "INFERNODE_TLS_CLIENT_KEY"


def node_tls(config: Config) -> ssl.SSLContext:
    """Trust for the CLI talking to its own node over TLS: the system CAs and the node's certificate itself.

    The node's own certificate is trusted as an anchor (partial chain), so a
    self-signed one works; with `tls_client_ca`, the client certificate and key come
    from $INFERNODE_TLS_CLIENT_CERT and $INFERNODE_TLS_CLIENT_KEY.
    """
    ctx = ssl.create_default_context()
    assert config.node.tls_cert is not None
    try:
        ctx.load_verify_locations(cafile=str(config.node.tls_cert))
    except (OSError, ssl.SSLError) as exc:
        raise OperationFailed(f"cannot read the node's certificate {config.node.tls_cert}: {exc}") from None
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if config.node.host in ("0.0.0.0", "::", "", "127.0.0.1", "::1", "localhost"):
        ctx.check_hostname = False  # loopback to a pinned certificate: the name in it does not matter
    cert, key = os.environ.get(CLIENT_CERT_ENV), os.environ.get(CLIENT_KEY_ENV)
    if config.node.tls_client_ca and cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx
