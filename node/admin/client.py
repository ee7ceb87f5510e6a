"""A client of the running node's admin API, for the CLI."""

from __future__ import annotations

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
        self.base = f"http://{host}:{config.node.port}"
        key = config.admin_key()
        if not key:
            raise OperationFailed(
                f"no admin key: set ${config.node.admin_key_env} or create {config.admin_key_path} "
                "(the node writes one there on first start)"
            )
        self._http = httpx.Client(base_url=self.base, headers={"authorization": f"Bearer {key}"}, timeout=timeout)

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

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self.request("PATCH", path, **kw)
