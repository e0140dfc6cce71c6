"""Every way a request can be refused, as a typed error with its status code, in one place.

The body is OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, so
clients written for OpenAI's API read it unchanged.
"""

from __future__ import annotations

import json


class ServeError(Exception):
    """A refused request: `status` is the HTTP code, `kind` OpenAI's ``error.type``."""

    status = 500
    kind = "server_error"
    outcome = "error"  # the request counter's label

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.headers = headers or {}

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()


class MalformedRequest(ServeError):
    """The body is not JSON."""

    status, kind, outcome = 400, "invalid_request_error", "invalid"


class Unauthorized(ServeError):
    status, kind, outcome = 401, "invalid_request_error", "unauthorized"

    def __init__(self, message: str = "missing or wrong API key: send 'Authorization: Bearer <key>'"):
        super().__init__(message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class ModelNotFound(ServeError):
    status, kind, outcome = 404, "invalid_request_error", "invalid"

    def __init__(self, requested: str, served: str):
        super().__init__(f"model {requested!r} is not served here; this server serves {served!r}",
                         param="model", code="model_not_found")


class BodyTooLarge(ServeError):
    status, kind, outcome = 413, "invalid_request_error", "too_large"

    def __init__(self, limit_bytes: int):
        super().__init__(f"request body is larger than the server's limit of {limit_bytes / 2**20:g} MiB "
                         "(--max-body-mb)", code="request_too_large")


class InvalidRequest(ServeError):
    """A field with a wrong type or value (outside the items themselves)."""

    status, kind, outcome = 422, "invalid_request_error", "invalid"


class ItemsRejected(ServeError):
    """Items that cannot be embedded (bad data, over a limit, or the model failed on the item alone);
    the message names each one by its index in `input`."""

    status, kind, outcome = 422, "invalid_request_error", "invalid"

    def __init__(self, failures):
        self.failures = sorted(failures, key=lambda f: f.index)
        first = self.failures[:10]
        more = f"; and {len(self.failures) - 10} more" if len(self.failures) > 10 else ""
        message = "; ".join(f"input[{f.index}]: {f.reason}" for f in first) + more
        super().__init__(message, param=f"input[{self.failures[0].index}]", code="invalid_input")


class QueueFull(ServeError):
    status, kind, outcome = 429, "rate_limit_error", "queue_full"

    def __init__(self, queued: int, limit: int, retry_after_s: int):
        super().__init__(f"the server is at capacity ({queued} items queued, --max-queue-items {limit}); "
                         f"retry after {retry_after_s} s", code="queue_full",
                         headers={"Retry-After": str(retry_after_s)})


class Unavailable(ServeError):
    """The batcher or the device is broken, or the server is shutting down."""

    status, kind, outcome = 503, "server_error", "unavailable"

    def __init__(self, message: str):
        super().__init__(message, code="unavailable")

