"""The admin API under /admin/v1 (FastAPI): error mapping and the routers.

Every route checks the caller's role (node/admin/access.py, node/accounts/roles.py).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from node.accounts.roles import Principal
from node.accounts.service import StorageConflict, StorageUnavailable
from node.admin.access import authenticate, need
from node.admin.batches import add_batch_routes
from node.admin.facade import AdminNode
from node.admin.fleet import add_fleet_routes
from node.admin.keys import add_key_routes
from node.admin.operations import add_model_routes, add_status_routes
from node.admin.plans import add_plan_routes
from node.admin.reports import add_audit_routes, add_usage_routes
from node.admin.teams import add_team_routes
from node.admin.tokens import add_token_routes
from node.errors import AuthenticationError, InvalidRequest, NodeError, RateLimited


def build_admin(node: AdminNode) -> FastAPI:
    """The admin app over the node's services (accounts, reports) and its operations."""
    app = FastAPI(title="infernode admin", openapi_url=None, docs_url=None, redoc_url=None)
    accounts, reports = node.accounts, node.reports

    @app.exception_handler(NodeError)
    async def _node_error(_: Request, err: NodeError) -> JSONResponse:
        return JSONResponse(status_code=err.status, content=json.loads(err.body()), headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        e = exc.errors()[0]
        param = ".".join(str(p) for p in e["loc"] if p != "body")
        err = InvalidRequest(f"{param}: {e['msg']}", param=param)
        return JSONResponse(status_code=422, content=json.loads(err.body()))

    @app.exception_handler(StorageUnavailable)
    async def _db_down(_: Request, exc: StorageUnavailable) -> JSONResponse:
        err = NodeError(f"database unavailable: {exc}", code="database_unavailable")
        return JSONResponse(status_code=503, content=json.loads(err.body()), headers={"retry-after": "5"})

    @app.exception_handler(StorageConflict)
    async def _conflict(_: Request, exc: StorageConflict) -> JSONResponse:
        err = InvalidRequest(f"already exists: {exc}", code="conflict")
        return JSONResponse(status_code=409, content=json.loads(err.body()))

    @app.middleware("http")
    async def _authenticated_first(request: Request, call_next: Any) -> Any:
        # 401 before FastAPI reads or validates a body: a stranger learns nothing of the routes. A failure
        # counts against the client's address; past its pace, 429 without the token being looked at.
        try:
            authenticate(accounts, request)
        except (AuthenticationError, RateLimited) as err:
            return JSONResponse(status_code=err.status, content=json.loads(err.body()), headers=err.headers)
        return await call_next(request)

    add_key_routes(app, accounts)
    add_team_routes(app, accounts)
    add_token_routes(app, accounts)
    add_plan_routes(app, accounts)
    add_usage_routes(app, accounts, reports)
    add_audit_routes(app, accounts, reports)
    add_status_routes(app, accounts, node)
    add_model_routes(app, accounts, node)
    add_fleet_routes(app, accounts, node)
    add_batch_routes(app, accounts, node)

    @app.get("/admin/v1/openapi.json", include_in_schema=False)
    async def openapi(_: Principal = need(accounts, "status.read")) -> dict[str, Any]:
        return app.openapi()  # the API's own description is for admin tokens only

    return app
