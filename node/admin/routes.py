"""The admin API under /admin/v1 (FastAPI): error mapping and the routers.

Every route checks the caller's role (node/admin/access.py, node/accounts/roles.py).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from node.accounts.roles import Principal
from node.accounts.storage import StorageConflict, StorageUnavailable
from node.admin.access import authenticate, need
from node.admin.accounts import add_account_routes
from node.admin.operations import add_operation_routes
from node.admin.reports import add_report_routes
from node.errors import AuthenticationError, InvalidRequest, NodeError, RateLimited

if TYPE_CHECKING:  # the running Node is handed in; only node/app.py and node/server.py import the wiring
    from node.app import Node


def build_admin(node: Node) -> FastAPI:
    app = FastAPI(title="infernode admin", openapi_url=None, docs_url=None, redoc_url=None)

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
            authenticate(node, request)
        except (AuthenticationError, RateLimited) as err:
            return JSONResponse(status_code=err.status, content=json.loads(err.body()), headers=err.headers)
        return await call_next(request)

    add_account_routes(app, node)
    add_operation_routes(app, node)
    add_report_routes(app, node)

    @app.get("/admin/v1/openapi.json", include_in_schema=False)
    async def openapi(_: Principal = need(node, "status.read")) -> dict[str, Any]:
        return app.openapi()  # the API's own description is for admin tokens only

    return app
