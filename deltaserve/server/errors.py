"""The one place where errors become OpenAI error bodies and HTTP status codes.

Every error a client can see has the body ``{"error": {"message", "type", "param", "code"}}``:

=====  ===========================  =======================================================================
400    invalid_request_error        bad JSON / types / ranges (``InvalidRequestError``, pydantic errors --
                                    never FastAPI's 422); prompt too long (code ``context_length_exceeded``)
401    authentication_error         missing or wrong ``Authorization: Bearer`` key
404    not_found_error              unknown model (code ``model_not_found``) or path
413    invalid_request_error        body over ``--max-request-bytes`` (code ``request_too_large``)
429    rate_limit_error             ``QueueFullError`` (with ``Retry-After: 1``)
501    not_implemented_error        a feature deltaserve does not implement (``echo``, images, ...)
503    service_unavailable_error    loading, draining, or ``EngineDeadError``
500    server_error                 anything else; logged with its traceback, and the server keeps serving
=====  ===========================  =======================================================================
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from deltaserve.errors import EngineDeadError, InvalidRequestError, PromptTooLongError, QueueFullError

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          499: "client_closed_request", 501: "not_implemented_error", 503: "service_unavailable_error"}


class ApiError(Exception):
    """An error raised by the server itself, already carrying its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def unsupported(message: str, param: str | None = None) -> ApiError:
    return ApiError(501, message, param, "unsupported")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception to the status and body a client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLongError):  # before InvalidRequestError: it is one
        return ApiError(400, str(exc), exc.param, "context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), exc.param)
    if isinstance(exc, ValidationError | RequestValidationError):
        return ApiError(400, validation_message(exc.errors()), _first_param(exc.errors()))
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc), None, "queue_full", {"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), None, "engine_dead")
    if isinstance(exc, ClientDisconnect):  # gone while sending its body: nobody reads this answer
        return ApiError(499, "the client closed the connection", None, "client_closed")
    if isinstance(exc, StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail or _phrase(exc.status_code)), None, None, exc.headers)
    logger.error("internal error: %r", exc, exc_info=exc)
    return ApiError(500, f"internal server error: {type(exc).__name__}: {exc}", None, "internal_error")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def error_response(exc: BaseException) -> JSONResponse:
    e = to_api_error(exc)
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)


# Union members show up in pydantic's error locations ("str", "list[str]", "tagged-union[...]"):
# they mean nothing to a client, so they are dropped from the path we report.
_TYPE_PART = re.compile(r"^(str|int|float|bool|none|dict\[.*|list\[.*|.*\[.*\]|function-.*)$")


def _path(loc: tuple) -> str:
    parts = [p for p in loc if not (isinstance(p, str) and _TYPE_PART.match(p)) and p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _first_param(errors: list[dict]) -> str | None:
    for e in errors:
        path = _path(tuple(e.get("loc", ())))
        if path:
            return re.split(r"[.\[]", path)[0]
    return None


def validation_message(errors: list[dict]) -> str:
    """One readable sentence per offending field (a union's alternatives joined with 'or')."""
    by_field: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for e in errors:
        path = _path(tuple(e.get("loc", ()))) or "body"
        if e.get("msg") not in by_field.setdefault(path, []):
            by_field[path].append(e.get("msg", "invalid"))
        inputs.setdefault(path, e.get("input"))
    parts = []
    for path, msgs in list(by_field.items())[:5]:
        got = repr(inputs[path])
        got = got if len(got) <= 60 else got[:57] + "..."
        parts.append(f"{path}: {' or '.join(msgs)} (got {got})")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI or Starlette would answer on its own through :func:`error_response`."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    for kind in (ApiError, StarletteHTTPException, RequestValidationError, ValidationError,
                 InvalidRequestError, QueueFullError, EngineDeadError, Exception):
        app.add_exception_handler(kind, handle)
