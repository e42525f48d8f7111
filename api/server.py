"""The OpenAI-compatible HTTP API over the studio's ModelManager: /v1/models, /v1/chat/completions,
/v1/completions (SSE streaming included), /health and /metrics (Prometheus text).

    app = build_api(manager, api_keys=["sk-..."], allow_origins=["*"], max_concurrent_requests=256)
    uvicorn.run(app, host="127.0.0.1", port=23333, **uvicorn_options())

The API asks the manager for the current pipeline on every request, so the model the UI loads is the one it
serves. Admission is bounded: past `max_concurrent_requests` engine requests in flight (a request with n choices
counts n), a request gets 429 with Retry-After at once rather than waiting. A client that goes away aborts its
requests, which frees their KV blocks. `begin_shutdown(app)` ends every running request (streams get an error event
and [DONE]) so a server can stop within its grace period. Routes live one file per endpoint family (chat.py,
completions.py, models.py) over service.py's shared skeleton; guard.py holds the middleware and the HTTP protocol.
This module imports fastapi and pydantic, never gradio.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.middleware.cors import CORSMiddleware

from api.chat import add_chat_routes
from api.completions import add_completion_routes
from api.connections import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_CONNECTIONS, ConnectionBudget, protocol_class
from api.errors import APIError, install_error_handlers
from api.guard import Guard
from api.limits import RequestLimits
from api.metrics import render_metrics
from api.models import add_model_routes
from api.service import Service
from studio.manager import ModelManager

MAX_BODY_BYTES = RequestLimits.max_body_bytes  # a request body past this is refused with 413, counted on bytes read
ROUTE_METHODS = {"/models": {"GET"}, "/chat/completions": {"POST"}, "/completions": {"POST"}}
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def build_api(manager: ModelManager, *, api_keys: list[str] | None = None, allow_origins: list[str] | None = None,
              max_concurrent_requests: int = 256, served_model_name: str | None = None,
              max_body_bytes: int | None = None, limits: RequestLimits | None = None) -> FastAPI:
    """The OpenAI-compatible API as a FastAPI app. Mount a UI on it at "/" (its routes come first) and run it
    with uvicorn. `api_keys`: Bearer keys required on /v1 and /metrics (None: open). `allow_origins`: CORS origins
    (None: no CORS headers). `served_model_name`: the model id clients see (default: the loaded model's name).
    `limits`: what one request may ask (api/limits.py); `max_body_bytes` overrides its body cap."""
    if max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests must be at least 1, got {max_concurrent_requests}")
    limits = limits or RequestLimits()
    max_body_bytes = limits.max_body_bytes if max_body_bytes is None else max_body_bytes
    service = Service(manager, served_model_name, max_concurrent_requests, limits)
    app = FastAPI(title="quant-studio OpenAI-compatible API", version="1.0")
    app.state.api = service
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        current = manager.current
        if service.stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if current is None:
            return JSONResponse({"status": "no model loaded"}, status_code=503)
        if not current.pipeline.engine.is_alive:
            return JSONResponse({"status": "engine stopped", "model": service.public_name()}, status_code=503)
        return {"status": "ok", "model": service.public_name()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        current = manager.current
        text = render_metrics(service.metrics, service.admission.in_flight, service.admission.limit,
                              service.public_name(), current.pipeline if current is not None else None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def refuse_method(allowed: str):
        async def wrong_method(request: Request):
            """A wrong method on /health or /metrics is OpenAI's 405 here (the UI mounted at "/" would say 404)."""
            raise APIError(405, f"{request.method} is not allowed on {request.url.path}; use {allowed}",
                           code="method_not_allowed", headers={"Allow": allowed})

        return wrong_method

    for path in ("/health", "/metrics"):
        app.add_api_route(path, refuse_method("GET"), methods=[m for m in ALL_METHODS if m not in ("GET", "HEAD")],
                          include_in_schema=False)

    router = APIRouter(prefix="/v1")
    add_model_routes(service, router)
    add_chat_routes(service, router)
    add_completion_routes(service, router)

    @router.api_route("/{path:path}", methods=ALL_METHODS, include_in_schema=False)
    async def unknown(path: str, request: Request):
        """Everything else under /v1 gets OpenAI error JSON (not the UI's 404): 405 for a known path's wrong
        method, 404 otherwise."""
        methods = ROUTE_METHODS.get("/" + path.rstrip("/"), {"GET"} if path.startswith("models/") else None)
        if methods is not None and request.method not in methods:
            raise APIError(405, f"{request.method} is not allowed on /v1/{path}; use {', '.join(sorted(methods))}",
                           code="method_not_allowed", headers={"Allow": ", ".join(sorted(methods))})
        raise APIError(404, f"no route {request.method} /v1/{path}", code="not_found")

    app.include_router(router)

    app.add_middleware(Guard, api_keys=api_keys, metrics=service.metrics, max_body_bytes=max_body_bytes)
    if allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in allow_origins,
                           expose_headers=["Retry-After"])
    return app


def begin_shutdown(app: FastAPI) -> None:
    """Stop taking requests and end the running ones: each stream sends an error event and [DONE] within a poll
    interval (0.5 s), each non-streamed request answers 503. Call from the event loop's thread or a signal handler."""
    service = getattr(app.state, "api", None)
    if service is not None:
        service.stopping = True


def uvicorn_options(header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
                    max_connections: int = MAX_CONNECTIONS, budget: ConnectionBudget | None = None) -> dict:
    """uvicorn.Config options that bound what slow or numerous clients can hold: request read deadlines, a
    connection cap and the budget of connections without credentials (guard.protocol_class; app.create_app makes
    the budget), with uvicorn's own limit on concurrent requests at the same number."""
    return {"http": protocol_class(header_timeout_s, body_timeout_s, max_connections, budget),
            "limit_concurrency": max_connections, "timeout_keep_alive": 5}
