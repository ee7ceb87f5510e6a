"""Admit: who is asking, whether they may, and whether the body is one the node will send on.

In the code's order: the key (from the head when dispatch already checked it), rate
admission (rpm counts the request from here, however it ends), the body decoded as
UTF-8 JSON, the model and the key's right to it, another API's body translated to
OpenAI's, the end user's admission, the fields the node itself reads, the context
check, and whether any model of the fallback chain can serve now. Decoding and the
checks of the fields clients send are node/gateway/intake.py's and fields.py's. Bad input of any
shape is a 4xx in the client API's error shape; the rest of the body is the worker's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from node.accounts.keys import KeyRecord, KeyRing
from node.accounts.quotas import Admission, Quotas
from node.errors import AuthenticationError, InvalidRequest, ModelNotFound, NoReadyReplica
from node.gateway import context
from node.gateway.adapter import OPENAI, Call, Route
from node.gateway.call import chain
from node.gateway.exchange import Admitted, Exchange, ModelInfo
from node.gateway.httpd import Request
from node.gateway.intake import Intake, decode, parse  # noqa: F401  (parse: gateway.py reads local bodies with it)
from node.workers.router import Router

log = logging.getLogger("infernode.gateway")


class Admitter:
    """The checks a request passes before it may wait for a worker."""

    def __init__(self, keys: KeyRing, quotas: Quotas, router: Router, *, log_prompts: bool = False,
                 loads_on_demand: bool = False) -> None:
        self.keys, self.quotas, self.router = keys, quotas, router
        self.log_prompts = log_prompts
        self.loads_on_demand = loads_on_demand  # an on-demand model without a ready replica is loaded, not refused
        self.draining = False
        self.intake = Intake()  # bodies decoded and checked; large ones (and their translation) off the loop

    def authenticate(self, req: Request, route: Route) -> KeyRecord:
        """The key's record for a request; AuthenticationError when it has none or a bad one."""
        if req.auth is not None:  # authenticated from the head, before the body was read (dispatch.py)
            return req.auth
        secret = route.credential(req)
        if not secret:
            hint = "x-api-key or Authorization: Bearer" if route.api == "anthropic" else "Authorization: Bearer"
            raise AuthenticationError(f"missing API key: send {hint} <key>")
        record = self.keys.lookup(secret.decode("latin-1"))
        if record is None:
            raise AuthenticationError("invalid API key")
        return record

    def admit(self, key: KeyRecord, endpoint: str, route: Route, client_rid: str | None, nid: str,
              lane: str | None = None) -> tuple[Admission, Exchange]:
        """Rate admission, before the body is decoded or checked: invalid requests count too.

        `lane` "batch" (the node's own batch lines, node/gateway/inprocess.py): budgets only, api = batch."""
        adm = self.quotas.admit(key, lane=lane)
        return adm, Exchange(nid, "", endpoint, key.id, key.team, None, time.perf_counter(),
                             api=lane or route.api, client_rid=client_rid)

    def check(self, req: Request, route: Route, key: KeyRecord, adm: Admission, ex: Exchange,
              models: Mapping[str, ModelInfo], ridb: bytes, body: dict[str, Any] | None = None) -> Admitted:
        """Decode and check what the node itself reads of a body (model, user, stream_options, the prompt's
        size) and translate another API's; the rest is the worker's. `body`: already decoded (Intake.read)."""
        raw = req.body
        if body is None:
            body = decode(raw, route.api)
        path = req.path
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required", param="model")
        if not route.passthrough and model not in models and model.endswith(":latest"):
            model = model[:-7]  # Ollama's clients name the default tag
        info = models.get(model)
        if info is None:
            raise ModelNotFound(f"the model '{model[:256]}' does not exist on this node", param="model")
        ex.model = adm.model = model
        self.quotas.check_model(key, model)
        if self.draining:
            raise NoReadyReplica("the node is shutting down", retry_after=5)
        call = None
        endpoint = ex.endpoint
        if not route.passthrough:
            targets = self.router.ready(model)
            if route.native and targets and targets[0].serves_api(route.native):
                endpoint, path = route.api, b"/v1" + route.native_path.encode()  # the runtime speaks it: pass through
                body["model"] = model
                route = OPENAI
            else:
                assert route.to_openai is not None  # upstream routes translate
                call = Call(model, ex.client_rid or ex.rid, int(time.time()), body, time.perf_counter())
                endpoint, body = route.to_openai(body)
                body["model"] = model
        ex.endpoint = endpoint
        user = body.get("user")
        if isinstance(user, str) and user:
            ex.user = user
            self.quotas.admit_user(adm, user)
        ex.stream = body.get("stream") is True
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options")
        ready = self.router.ready(model)
        why = ready[0].cannot(endpoint) if ready else None
        if why:
            raise InvalidRequest(f"the model '{model}' cannot serve {endpoint}: {why}", param="model",
                                 code="unsupported_endpoint")
        if self.log_prompts:  # off unless `[node] log_prompts = true`: prompts are the users' data
            self._log_prompt(body, ex, model)
        if endpoint in ("chat", "completions"):
            context.check(body, endpoint, self.context_len(info))
        loadable = self.loads_on_demand
        if not ready and not (info.on_demand and loadable) and not any(
                (m.on_demand and loadable) or self.router.ready(m.name)
                for m in chain(models, self.quotas, info, key)[1:]):
            raise NoReadyReplica(f"model '{model}' has no ready replica yet", retry_after=5)
        return Admitted(key, adm, ex, info, body, raw, path, route, call, ridb)

    def context_len(self, info: ModelInfo) -> int | None:
        """The model's context: configured, else what its launch plan says."""
        return info.max_model_len or self.router.context.get(info.name)

    @staticmethod
    def _log_prompt(body: dict[str, Any], ex: Exchange, model: str) -> None:
        prompt = body.get("messages", body.get("prompt", body.get("input")))
        rid = ex.client_rid or ex.rid
        try:
            # Readable text; a lone surrogate (valid JSON) becomes a visible escape rather than breaking the log.
            shown = json.dumps(prompt, ensure_ascii=False)[:8192].encode("utf-8", "backslashreplace").decode()
        except (RecursionError, ValueError):
            shown = "(not loggable)"
        log.info("request %s prompt", rid, extra={"request_id": rid, "model": model, "prompt": shown})
