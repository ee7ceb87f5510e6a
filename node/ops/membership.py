"""This node's membership of a LiteLLM fleet: the fleet key, the reconciler, and what admins ask of them.

The node (node/app.py) owns one; the admin API's fleet routes reach it through the node's
`Operations`. Every mint of the fleet key is an audit record (actor `node`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from node.accounts.keys import KeyRecord
from node.accounts.service import Accounts
from node.accounts.storage import StorageUnavailable
from node.config import Config
from node.errors import UpstreamError
from node.ops.fleet import FleetReconciler, LiteLLMAdmin, ProxyError, desired_deployments, ensure_fleet_key, read_master_key

log = logging.getLogger("infernode.fleet")


class Membership:
    """The fleet side of the node: made lazily, from `[fleet.litellm]`."""

    def __init__(self, config: Config, accounts: Accounts, ready_models: Callable[[], list[str]]) -> None:
        self.config, self.accounts, self.ready_models = config, accounts, ready_models
        self.fleet: FleetReconciler | None = None

    def reconciler(self) -> FleetReconciler:
        if self.fleet is None:
            assert self.config.fleet.litellm is not None
            admin = LiteLLMAdmin(self.config.fleet.litellm.url, read_master_key(self.config))
            self.fleet = FleetReconciler(self.config, admin, ready_models=self.ready_models, api_key=self.key)
        return self.fleet

    async def start(self, *, register: bool) -> None:
        """Make (or reuse) the fleet key; with register, keep the proxy's deployments true."""
        fleet = self.reconciler()
        try:
            await self.key()
        except StorageUnavailable as exc:
            log.warning("fleet: cannot create the fleet key yet: %s", exc)
        if register:
            fleet.start()

    async def key(self) -> str:
        """The secret of the node key the fleet proxy uses (created once, then reused)."""
        return (await self._key())[1]

    async def _key(self) -> tuple[str, str, bool]:
        """(key id, secret, whether it was minted now); every mint is an audit record."""
        minted = False

        async def mint(**fields: Any) -> tuple[KeyRecord, str]:
            nonlocal minted
            record, secret = await self.accounts.create_key(**fields)
            minted = True
            await self.accounts.audit_as("node", "node", "node", "fleet.key.create", record.id, record.public(), "")
            return record, secret
        key_id, secret = await ensure_fleet_key(self.config, self.accounts.keys.get, mint)
        if self.fleet is not None:
            self.fleet.status.key_id = key_id
        return key_id, secret, minted

    def poke(self) -> None:
        if self.fleet is not None:
            self.fleet.poke()

    def reconfigure(self, config: Config) -> None:
        """A reload: per-model rpm/tpm/order/tags may change; the proxy URL and key stay until restart."""
        self.config = config
        if self.fleet is not None and config.fleet.litellm is not None:
            self.fleet.config = config.model_copy(update={"fleet": self.fleet.config.fleet})
            self.fleet.poke()

    def proxy(self) -> str | None:
        """The fleet proxy's URL, or None without [fleet.litellm]."""
        return self.config.fleet.litellm.url if self.config.fleet.litellm is not None else None

    def status(self) -> dict[str, Any]:
        if self.fleet is None:
            return {"enabled": False, "reason": "no [fleet.litellm] section in appliance.toml"}
        return {**dataclasses.asdict(self.fleet.status), "ready_models": self.ready_models()}

    async def register(self) -> dict[str, Any]:
        """Register this node's models with the proxy now (and keep them true from then on)."""
        await self.start(register=True)
        assert self.fleet is not None
        try:
            registered = await self.fleet.sync()
        except ProxyError as exc:
            self.fleet.status.last_error = str(exc)
            raise UpstreamError(str(exc), code="fleet_proxy_error", source="proxy") from None
        return {**dataclasses.asdict(self.fleet.status), "registered": registered}

    async def deregister(self) -> int:
        """Remove this node's deployments from the proxy; the number removed."""
        if self.fleet is None:
            return 0
        self.fleet.status.registering = True  # deregister even when it was never started here
        removed = await self.fleet.stop(deregister=True, timeout=15.0)
        if self.fleet.status.last_error and self.fleet.status.last_error.startswith("deregistration failed"):
            raise UpstreamError(self.fleet.status.last_error, code="fleet_proxy_error", source="proxy")
        return removed

    async def deployments(self) -> tuple[str, bool, list[dict[str, Any]]]:
        """The proxy's deployments for every model, with the fleet key (key id, whether minted now, bodies)."""
        self.reconciler()
        key_id, secret, minted = await self._key()
        deps = desired_deployments(self.config, secret, [m.name for m in self.config.models])
        return key_id, minted, [d.body() for d in deps]

    async def stop(self, *, detach: bool) -> None:
        """Leave the fleet (a detach, an upgrade, keeps the ids for the successor)."""
        if self.fleet is not None:
            await self.fleet.stop(deregister=not detach)
            await self.fleet.admin.aclose()
