"""OpenAI error JSON (`{"error": {"message", "type", "param", "code"}}`) with the right status, for every failure.

Bad input is a 4xx with a message that says what to change; a 500 means a bug in this server, never the client's
fault. FastAPI's 422 for validation failures becomes OpenAI's 400.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.api_error import APIError  # noqa: F401 - re-exported: api.errors.APIError is what routes raise
from api.schemas import ErrorInfo, ErrorResponse
from api.serving import ClientDisconnected, ModelUnloaded, ServerStopping
from engine.errors import (
    BadInputError,
    EngineUnavailableError,
    ImageInputError,
    ModelLoadError,
    PromptTooLongError,
)

log = logging.getLogger(__name__)

UNLOADED_MESSAGE = "the request was aborted: the model was unloaded or replaced, or the server is stopping; retry"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def from_engine_error(e: Exception) -> APIError:
    """An exception from running a request as the APIError the client gets: the engine's user-facing errors
    (engine.errors) by class, anything else as a 500 (a bug in this server, logged)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, ImageInputError):
        return APIError(400, str(e), code="image_input_not_supported")
    if isinstance(e, ServerStopping):
        return APIError(503, "the server is shutting down: this request was ended; retry later",
                        code="server_shutting_down")
    if isinstance(e, EngineUnavailableError | ModelUnloaded | ClientDisconnected):
        return APIError(503, UNLOADED_MESSAGE, code="model_unloaded")
    if isinstance(e, ModelLoadError):
        return APIError(400, str(e), code="model_load_error")
    if isinstance(e, BadInputError | ValueError):
        return APIError(400, str(e))
    log.error("request failed in the engine", exc_info=e)
    return APIError(500, f"the engine failed on this request ({type(e).__name__}: {e})", code="engine_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def sse_error(status: int, message: str, code: str | None = None) -> str:
    """An error event inside a stream whose 200 is already sent; the `openai` client raises it as an APIError."""
    return f"data: {json.dumps(error_body(status, message, code=code))}\n\n"


def _describe_validation_errors(errors) -> tuple[str, str | None]:
    parts, first_param = [], None
    for err in list(errors)[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        first_param = first_param or param
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return f"malformed JSON body: {ctx.get('error', err.get('msg'))}", None
        parts.append(f"{param or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts), first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _describe_validation_errors(exc.errors())
        return error_response(400, message, param=param, code="invalid_value" if param else "invalid_body")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__})")
