"""What the whole app (API + UI) checks before a route runs: the login gate (with a login or API keys configured,
a client without credentials reaches only /health, the login page and its static assets) and the body cap of every
route, multipart included, counted on the bytes read.

Pure ASGI middleware, like guard.py's: streaming and disconnect detection pass through untouched. They know nothing
of Gradio: app.py hands the gate a `session_ok(headers)` check for the UI's login cookie.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse

from api.connections import ConnectionBudget
from api.errors import error_body
from api.guard import DRAIN_BYTES, bearer_ok, drain

API_PREFIXES = ("/v1", "/metrics")
# What a browser needs to show the login page and log in; everything else of the UI needs the login first.
OPEN_UI_PATHS = frozenset({"/", "/login", "/login/", "/config", "/config/", "/favicon.ico", "/theme.css",
                           "/gradio_api/theme.css", "/manifest.json", "/robots.txt"})
OPEN_UI_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
LOGIN_MAX_BODY_BYTES = 64 * 2**10  # a user name and a password, form-encoded or multipart
UPLOAD_MAX_BODY_BYTES = 256 * 2**20  # --max-upload-mb: files sent to the UI (calibration data, images)
UI_MAX_BODY_BYTES = 32 * 2**20  # every other UI route (Gradio's JSON events)


def route_path(scope) -> str:
    path, root_path = scope.get("path", ""), scope.get("root_path", "")
    if root_path and path.startswith(root_path):  # behind a proxy prefix (--root-path): path includes it
        path = path[len(root_path):]
    return path or "/"


def is_api_path(path: str) -> bool:
    return path == "/health" or any(path == p or path.startswith(p + "/") for p in API_PREFIXES)


class LoginGate:
    """ASGI middleware over the whole app. Marks a connection trusted (ConnectionBudget) on its first request with a
    valid API key or UI session, or to the open /v1 API when no keys are set. With `session_ok` (a login is
    configured), a UI request without a session is answered 401 here, whatever the route (Gradio's heartbeat,
    cancel, reset and upload routes included), except the login page, its assets and POST /login."""

    def __init__(self, app, *, session_ok: Callable[[dict], bool] | None, api_keys: list[str] | None,
                 budget: ConnectionBudget):
        self.app, self.session_ok, self.budget = app, session_ok, budget
        self.api_keys = [k.encode() for k in api_keys or [] if k]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        headers = dict(scope.get("headers") or [])
        api = is_api_path(path)
        has_key = bool(self.api_keys) and bearer_ok(headers, self.api_keys)
        has_session = self.session_ok is not None and self.session_ok(headers)
        if has_key or has_session or (api and path != "/health" and not self.api_keys):
            self.budget.trust(scope.get("client"))
        if api and self.api_keys and not has_key and path != "/health" and scope.get("method") != "OPTIONS":
            self.budget.refused(scope.get("client"))  # Guard answers it 401
        if api or self.session_ok is None or has_session or self._open(scope, path):
            await self.app(scope, receive, send)
            return
        self.budget.refused(scope.get("client"))
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = error_body(401, "log in first: this server requires a login for the UI and its Gradio API",
                          code="login_required")
        await JSONResponse(body, status_code=401)(scope, receive, send)

    @staticmethod
    def _open(scope, path: str) -> bool:
        method = scope.get("method")
        if path in ("/login", "/login/"):
            return method == "POST"
        return method in ("GET", "HEAD") and (path in OPEN_UI_PATHS or path.startswith(OPEN_UI_PREFIXES))


class BodyLimit:
    """ASGI middleware: every non-API request body (the API's own is capped by guard.Guard) is bounded by the bytes
    actually read, chunked and multipart bodies included: POST /login at LOGIN_MAX_BODY_BYTES, uploads at
    `upload_bytes`, anything else at `other_bytes`. A declared Content-Length over the cap is refused before reading;
    a body that grows past it is answered 413 at once and the route sees a disconnect, so no parser ever holds
    more than the cap."""

    def __init__(self, app, *, upload_bytes: int = UPLOAD_MAX_BODY_BYTES, other_bytes: int = UI_MAX_BODY_BYTES):
        self.app, self.upload_bytes, self.other_bytes = app, upload_bytes, other_bytes

    def limit_for(self, path: str) -> int:
        if path.rstrip("/") == "/login":
            return LOGIN_MAX_BODY_BYTES
        if path.rstrip("/") == "/gradio_api/upload":
            return self.upload_bytes
        return self.other_bytes

    async def __call__(self, scope, receive, send) -> None:
        path = route_path(scope)
        if scope["type"] != "http" or is_api_path(path) or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(path)
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            await JSONResponse(error_body(400, "invalid Content-Length header"), status_code=400)(scope, receive,
                                                                                                 send)
            return
        if declared is not None and declared > limit:
            if declared <= limit + DRAIN_BYTES:
                await drain(receive)  # a body a little over the cap: read it so the 413 reaches the client
            await self._too_large(limit)(scope, receive, send)
            return
        state = {"read": 0, "refused": False, "started": False}

        async def counting_send(message) -> None:
            if state["refused"]:
                return  # the 413 went out instead; the route's own answer is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        async def counting_receive():
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    if not state["started"]:
                        await self._too_large(limit)(scope, receive, send)
                    state["refused"] = True
                    return {"type": "http.disconnect"}
            return message

        try:
            await self.app(scope, counting_receive, counting_send)
        except Exception:
            if not state["refused"]:
                raise
            # the route failed on the disconnect it was handed after the 413: expected, nothing to report

    @staticmethod
    def _too_large(limit: int) -> JSONResponse:
        return JSONResponse(error_body(413, f"request body over {limit} bytes on this route"), status_code=413,
                            headers={"Connection": "close"})


GENERIC_ANSWERS = {b'{"detail":"Not Found"}': "no route", b'{"detail":"Method Not Allowed"}': "method not allowed on"}


class OpenAIShapedMisses:
    """ASGI middleware: the UI's router answers an unknown route (404) or a wrong method (405) with Starlette's
    generic `{"detail": ...}`; here they become OpenAI error JSON like the API's own. Other answers pass untouched
    (only a 404 / 405 JSON response is looked at, and only Starlette's two generic bodies are rewritten)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict | None = None
        chunks: list[bytes] = []

        async def shaping_send(message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] in (404, 405) and \
                    dict(message.get("headers") or []).get(b"content-type", b"").startswith(b"application/json"):
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            what = GENERIC_ANSWERS.get(body)
            if what is not None:
                body = JSONResponse(error_body(held["status"], f"{what} {scope.get('method')} {scope.get('path')}",
                                               code="not_found" if held["status"] == 404 else "method_not_allowed")
                                    ).body
            headers = [(k, v) for k, v in held.get("headers") or [] if k != b"content-length"]
            await send({**held, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, shaping_send)
