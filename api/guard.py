"""What stands between the network and the API's routes: admission (concurrent generations, 429), the API guard
(Bearer keys, the body cap on the bytes actually read, status counts), login throttling for the UI and the login
page filter. The HTTP protocol (read deadlines, connection caps) is in connections.py, the UI's gate in gate.py.

All are pure ASGI or asyncio protocol code (not BaseHTTPMiddleware), so streaming and disconnect detection pass
through untouched.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Callable

from fastapi.responses import JSONResponse, Response

from api.errors import APIError, error_body
from api.metrics import APIMetrics

RETRY_AFTER_S = 1
PROTECTED_PREFIXES = ("/v1", "/metrics")  # what --api-keys guards here; app.py puts the UI behind a login too
KNOWN_ROUTES = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
LOGIN_DELAY_S = 0.5  # per recent failed login of the same client, up to LOGIN_MAX_DELAY_S
LOGIN_MAX_DELAY_S = 5.0
LOGIN_FAILURE_WINDOW_S = 300.0


class Admission:
    """Engine requests in flight through the API, bounded. The event loop is the only caller: no lock."""

    def __init__(self, limit: int, metrics: APIMetrics):
        self.limit, self.in_flight, self.metrics = limit, 0, metrics

    def check(self, weight: int) -> None:
        if weight > self.limit:
            raise APIError(400, f"this request needs {weight} concurrent generations (prompts x n) but the server "
                                f"allows {self.limit}; lower n or send fewer prompts", param="n")
        if self.in_flight + weight > self.limit:
            self.metrics.num_rejected += 1
            raise APIError(429, f"the server is busy: {self.in_flight} of {self.limit} concurrent requests are in "
                                f"flight; retry after {RETRY_AFTER_S} s", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def acquire(self, weight: int) -> Callable[[], None]:
        self.check(weight)
        self.in_flight += weight
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= weight

        return release


def bearer_ok(headers: dict[bytes, bytes], keys: list[bytes]) -> bool:
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    token = token.strip()
    return scheme.lower() == b"bearer" and any(hmac.compare_digest(token, key) for key in keys)


class _BodyTooLarge(Exception):
    pass


async def read_body(receive, limit: int) -> bytes | None:
    """The whole request body, counting the bytes as they arrive (chunked bodies too); None if the client left.
    Raises _BodyTooLarge as soon as more than `limit` bytes came, without reading the rest."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise _BodyTooLarge()
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


DRAIN_BYTES = 1 << 20  # after a 413, read (and drop) up to this much more of the body so the answer arrives
DRAIN_TIMEOUT_S = 2.0  # (closing with unread bytes makes the kernel reset the connection: the client sees no 413)


async def drain(receive, max_bytes: int = DRAIN_BYTES, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Read and drop what is left of a refused request body, bounded in bytes and time."""
    async def _drain():
        left = max_bytes
        while left > 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            left -= len(message.get("body", b""))

    try:
        await asyncio.wait_for(_drain(), timeout_s)
    except asyncio.TimeoutError:
        pass


def replaying(body: bytes, receive):
    """A receive that hands the app the body already read, then the connection's own events (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class Guard:
    """ASGI middleware on the API's paths: Bearer-key check, body-size cap on the bytes read, status counts."""

    def __init__(self, app, api_keys: list[str] | None, metrics: APIMetrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.api_keys = [k.encode() for k in api_keys or [] if k]

    async def __call__(self, scope, receive, send) -> None:
        path, root_path = scope.get("path", ""), scope.get("root_path", "")
        if root_path and path.startswith(root_path):  # behind a proxy prefix (--root-path): path includes it
            path = path[len(root_path):]
        is_api = path == "/health" or any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)
        if scope["type"] != "http" or not is_api:
            await self.app(scope, receive, send)
            return
        route = path if path in KNOWN_ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        status_box = [0]

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            rejection = self._check(scope, path)
            if rejection is None and scope["method"] in BODY_METHODS:
                try:
                    body = await read_body(receive, self.max_body_bytes)
                except _BodyTooLarge:
                    rejection = self._too_large()
                else:
                    if body is None:  # the client went away before sending its body
                        status_box[0] = 499
                        return
                    receive = replaying(body, receive)
            if rejection is not None:
                if getattr(rejection, "status_code", 0) == 413 and scope["method"] in BODY_METHODS and \
                        self._declared_length(scope) <= self.max_body_bytes + DRAIN_BYTES:
                    await drain(receive)  # a body a little over the cap: read it so the 413 reaches the client
                await rejection(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_requests[(route, status_box[0] or 500)] += 1

    @staticmethod
    def _declared_length(scope) -> int:
        try:
            return int(dict(scope.get("headers") or []).get(b"content-length", b"0"))
        except ValueError:
            return 0

    def _too_large(self) -> Response:
        return JSONResponse(error_body(413, f"request body over {self.max_body_bytes} bytes"), status_code=413,
                            headers={"Connection": "close"})

    def _check(self, scope, path: str) -> Response | None:
        headers = dict(scope.get("headers") or [])
        if self.api_keys and path != "/health" and scope["method"] != "OPTIONS" and not bearer_ok(headers,
                                                                                                  self.api_keys):
            body = error_body(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
            return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return JSONResponse(error_body(400, "invalid Content-Length header"), status_code=400)
            if too_big:
                return self._too_large()
        return None


class LoginThrottle:
    """ASGI middleware: a failed UI login (POST .../login answered 4xx) delays that client's next login attempts by
    LOGIN_DELAY_S per failure in the last LOGIN_FAILURE_WINDOW_S, up to LOGIN_MAX_DELAY_S. A success clears it."""

    def __init__(self, app, login_path: str = "/login"):
        self.app, self.login_path = app, login_path.rstrip("/")
        self.failures: dict[str, list[float]] = {}

    def delay_for(self, client: str) -> float:
        now = time.monotonic()
        recent = [t for t in self.failures.get(client, []) if now - t < LOGIN_FAILURE_WINDOW_S]
        if recent:
            self.failures[client] = recent
        else:
            self.failures.pop(client, None)
        return min(LOGIN_MAX_DELAY_S, LOGIN_DELAY_S * len(recent))

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or path.rstrip("/") != self.login_path:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        delay = self.delay_for(client)
        if delay:
            await asyncio.sleep(delay)
        status_box = [0]

        async def watching_send(message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        await self.app(scope, receive, watching_send)
        if 400 <= status_box[0] < 500:
            if len(self.failures) > 10_000:  # bounded memory under a spray of addresses
                self.failures.clear()
            self.failures.setdefault(client, []).append(time.monotonic())
        elif 200 <= status_box[0] < 400:
            self.failures.pop(client, None)


_API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)


class PreLoginPageFilter:
    """ASGI middleware for the UI's HTML pages: a page served to a visitor who has not logged in (its embedded
    config says auth_required) carries no API description either. Gradio embeds one in every page, with the
    defaults of every input: server paths such as the demo model's and the quantized folders'."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def filtering_send(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"text/html"):
                    start = message  # held until the body is complete
                    return
                await send(message)
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(chunks)
                if b'"auth_required": true' in body or b'"auth_required":true' in body:
                    body = _API_INFO.sub(b"window.gradio_api_info = null;</script>", body)
                headers = [(k, v) for k, v in start.get("headers") or [] if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
            else:
                await send(message)

        await self.app(scope, receive, filtering_send)
