"""The node's error hierarchy: each error knows its HTTP status and OpenAI error type.

Errors are mapped to responses once, at the API edge (`NodeError.body()`), and to
exit codes once, in the CLI.
"""

from __future__ import annotations

import json

# The longest Retry-After the node sends: the official SDKs sleep for whatever it says
# (the anthropic SDK without a cap), so a longer wait is said in a header of its own.
RETRY_AFTER_CAP_S = 60


class NodeError(Exception):
    """Base of every error the node reports to a user or client."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        source: str = "node",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.source = source
        self.headers = headers or {}

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again (else clients get `x-should-retry: false`)."""
        return self.status in (408, 409, 429) or self.status >= 500

    def body(self) -> bytes:
        """The OpenAI-shaped error body; `source` says whether node or worker produced it."""
        return json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                    "source": self.source,
                }
            }
        ).encode()


class ConfigError(NodeError):
    """Bad `appliance.toml` or `models.lock`: one line naming the file, the key and the fix."""

    status = 500
    type = "config_error"

    def __init__(self, file: str, key: str, problem: str, fix: str = "") -> None:
        self.file, self.key, self.problem, self.fix = file, key, problem, fix
        line = f"{file}: {key}: {problem}" if key else f"{file}: {problem}"
        if fix:
            line += f"; {fix}"
        super().__init__(line)


class InvalidRequest(NodeError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(NodeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(NodeError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(NodeError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTimeout(NodeError):
    """The client did not send its whole request in time."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class HeadersTooLarge(NodeError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class BodyTooLarge(NodeError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(NodeError):
    """429: a quota, rate limit or backpressure limit; always carries an integer Retry-After.

    `retry_after` is the wait until the limit frees (a budget's period may end in weeks:
    cap=None); the Retry-After header says at most RETRY_AFTER_CAP_S. A refusal that
    waiting a minute cannot cure (`cures_soon=False`: a spent budget) also says
    `x-should-retry: false`, which the official SDKs obey instead of retrying.
    """

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, reason: str, cap: float | None = 60,
                 cures_soon: bool = True, **kw) -> None:
        wait = int(retry_after + 0.999)
        self.retry_after = max(1, wait if cap is None else min(int(cap), wait))
        self.reason = reason
        self.cures_soon = cures_soon
        headers = dict(kw.pop("headers", None) or {})
        headers["retry-after"] = str(min(self.retry_after, RETRY_AFTER_CAP_S))
        super().__init__(message, headers=headers, **kw)

    @property
    def retryable(self) -> bool:
        return self.cures_soon


class NoReadyReplica(NodeError):
    status = 503
    type = "service_unavailable"
    code = "model_not_ready"

    def __init__(self, message: str, *, retry_after: int = 5, cures_soon: bool = True, **kw) -> None:
        # cures_soon=False: only an operator can help (a failed load, a model that never fits): not retried.
        self.cures_soon = cures_soon
        super().__init__(message, headers={"retry-after": str(min(retry_after, RETRY_AFTER_CAP_S))}, **kw)

    @property
    def retryable(self) -> bool:
        return self.cures_soon


class UpstreamError(NodeError):
    status = 502
    type = "upstream_error"
    code = "worker_failed"


class UpstreamTimeout(NodeError):
    status = 504
    type = "upstream_error"
    code = "worker_timeout"


class StoreError(NodeError):
    """The store does not hold what `models.lock` pins (missing, corrupt or wrong size)."""

    type = "store_error"


class OperationFailed(NodeError):
    """A CLI operation failed for reasons outside the user's input (exit code 1)."""
