"""The one error shape, `{"error": {"type", "message", ...details}}`, and the one place where domain
errors become HTTP status codes. Unexpected exceptions answer a bare 500 (logged, never echoed)."""

from __future__ import annotations

import logging
import math
import re
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cltune.errors import (
    CLTuneError,
    ConfigError,
    ConflictError,
    DataError,
    InvalidAdapterError,
    InvalidNameError,
    MissingDependencyError,
    NotFoundError,
    StoreError,
    UnknownNameError,
)

log = logging.getLogger("cltune.api")

# First match along the exception's MRO wins (LeaseLost is a ConflictError -> 409).
STATUS: dict[type[CLTuneError], int] = {
    ConfigError: 422,
    DataError: 422,
    UnknownNameError: 422,
    InvalidNameError: 422,
    InvalidAdapterError: 422,
    NotFoundError: 404,
    ConflictError: 409,
    MissingDependencyError: 501,
    StoreError: 503,  # the shared artifact store is down: the request may succeed later
    CLTuneError: 400,
}
HTTP_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
}


class ApiError(Exception):
    """An HTTP error raised by the API layer itself (auth, uploads, request shape)."""

    def __init__(
        self, status: int, type_: str, message: str, headers: dict[str, str] | None = None, **details: Any
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers, self.details = (
            status,
            type_,
            message,
            headers,
            details,
        )


def jsonable(x: Any) -> Any:
    """`x` with what JSON cannot hold made text: NaN and infinities (a client may send them, and an
    error echoes its input) become "NaN", "Infinity", "-Infinity"; lone surrogates are replaced."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, str):
        return x.encode("utf-8", "replace").decode("utf-8")
    return x


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None, **details: Any
) -> JSONResponse:
    body = {"type": type_, "message": message, **{k: v for k, v in details.items() if v is not None}}
    return JSONResponse({"error": jsonable(body)}, status_code=status, headers=headers)


def status_of(exc: CLTuneError) -> int:
    return next(STATUS[c] for c in type(exc).__mro__ if c in STATUS)


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            where, loc = loc[0], loc[1:]
        else:
            where = "request"
        msg = err.get("msg", "")
        if err.get("type") == "json_invalid":  # loc holds the character offset of the syntax error
            msg = f"{(err.get('ctx') or {}).get('error', msg)} at character {loc[0] if loc else '?'}"
            loc = []
        out.append({"in": where, "field": ".".join(loc) or "(root)", "message": msg, "type": err.get("type")})
    return out


def allowed_methods(request: Request) -> list[str]:
    """Every method the API serves at the request's path, as its OpenAPI schema lists them (Starlette's
    405 names only the first matching route's: `Allow: POST` on /v1/datasets, which also answers GET)."""
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        pattern = "[^/]+".join(re.escape(part) for part in re.split(r"\{[^{}/]+\}", template))
        if re.fullmatch(pattern, request.url.path):
            methods |= {m.upper() for m in item if m in _METHODS}
    return sorted(methods)


_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def install(app: FastAPI) -> None:
    """Register the handlers so that every error answers the same shape."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.headers, **exc.details)

    @app.exception_handler(CLTuneError)
    async def _domain(_: Request, exc: CLTuneError) -> JSONResponse:
        return JSONResponse({"error": jsonable(exc.to_dict())}, status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if any(e["in"] == "body" for e in errors) and ctype != "application/json":
            return error_response(
                415,
                "unsupported_media_type",
                f"content type {ctype or '(none)'!r} is not "
                "accepted here; send a JSON body with Content-Type: application/json",
            )
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(
                400,
                "invalid_json",
                "the request body is not valid JSON: " + "; ".join(e["message"] for e in errors),
                errors=errors,
            )
        msg = "; ".join(f"{e['in']} {e['field']}: {e['message']}" for e in errors)
        return error_response(422, "invalid_request", f"invalid request: {msg}", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message, headers = str(exc.detail), getattr(exc, "headers", None)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            return error_response(  # FastAPI's answer when the JSON parser itself fails (e.g. RecursionError)
                400,
                "invalid_json",
                "the request body could not be parsed as JSON (nested too deeply?); send one JSON object",
            )
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path!r}; the API is documented at /docs"
        elif exc.status_code == 405:
            allowed = ", ".join(allowed_methods(request)) or (headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path!r}; allowed: {allowed}"
            headers = {**(headers or {}), "Allow": allowed}
        return error_response(
            exc.status_code, HTTP_TYPES.get(exc.status_code, "http_error"), message, headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, _exc: Exception) -> JSONResponse:
        ref = secrets.token_hex(4)
        log.exception("unhandled error %s on %s %s", ref, request.method, request.url.path)
        return error_response(
            500, "internal_error", f"internal server error (reference {ref}); see the server log"
        )
