"""What stands between the network and the routes: admission (concurrent generations, 429), the API guard (Bearer
keys, the body cap on the bytes actually read, status counts), login throttling for the UI, and the HTTP protocol
with header / body read deadlines and a connection cap (slow clients cannot hold the server's sockets).

All are pure ASGI or asyncio protocol code (not BaseHTTPMiddleware), so streaming and disconnect detection pass
through untouched.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import re
import time
from collections.abc import Callable

import h11
from fastapi.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.errors import APIError, error_body
from api.metrics import APIMetrics

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
PROTECTED_PREFIXES = ("/v1", "/metrics")  # what --api-keys guards here; app.py puts the UI behind a login too
KNOWN_ROUTES = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
HEADER_TIMEOUT_S = 10.0  # from a connection's first byte (or a kept-alive one's next byte) to the end of its headers
BODY_TIMEOUT_S = 60.0  # from the end of the headers to the end of the body (32 MiB at ~4 Mbit/s)
MAX_CONNECTIONS = 1024  # open sockets; past it a new connection is closed at once
MAX_UNTRUSTED_CONNECTIONS = 64  # with a login / keys: sockets without credentials; past it the oldest is closed
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


class ConnectionBudget:
    """Which open connections have shown credentials. With a login or API keys configured, the connections that have
    not (idle sockets, requests without credentials, the login page and its assets) share `max_untrusted` slots:
    past it one of them is closed (a refused one first, from the address holding the most, the oldest), so they
    can never take the slots authenticated clients need. A connection is trusted from its first request that
    carries a valid key or UI session (LoginGate says so)."""

    def __init__(self, max_untrusted: int | None = None):
        self.max_untrusted = max_untrusted  # None: no distinction (nothing is protected)
        self._untrusted: dict[object, asyncio.Transport] = {}  # peer -> transport, oldest first
        self._closing: set = set()  # evicted, their connection_lost still to come: they hold no slot any more
        self._refused: set = set()  # untrusted connections that asked for something without credentials
        self.num_evicted = 0

    def opened(self, peer, transport) -> None:
        if self.max_untrusted is None or peer is None:
            return
        self._untrusted[peer] = transport
        while len(self._untrusted) > self.max_untrusted:
            victim = self._victim()
            self.num_evicted += 1
            self._closing.add(victim)
            self._refused.discard(victim)
            self._untrusted.pop(victim).close()

    def _victim(self):
        """Which untrusted connection goes: one that was refused (sent a request without credentials) before one
        that has sent nothing yet, from the address holding the most of them, the oldest of those."""
        pool = [p for p in self._untrusted if p in self._refused] or list(self._untrusted)
        per_host = collections.Counter(p[0] for p in pool)
        top = max(per_host.values())
        return next(p for p in pool if per_host[p[0]] == top)

    def refused(self, peer) -> None:
        """The gate answered this connection's request 401: it is first in line to go."""
        if peer is not None and tuple(peer) in self._untrusted:
            self._refused.add(tuple(peer))

    def closed(self, peer) -> None:
        self._untrusted.pop(peer, None)
        self._closing.discard(peer)
        self._refused.discard(peer)

    @property
    def num_closing(self) -> int:
        return len(self._closing)

    def trust(self, peer) -> None:
        if peer is not None:
            self._untrusted.pop(tuple(peer), None)
            self._refused.discard(tuple(peer))

    @property
    def num_untrusted(self) -> int:
        return len(self._untrusted)


HALF_CLOSE_PROBE_S = (0.1, 0.2, 0.4, 0.8, 1.6)  # then every 2 s; see eof_received
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"


def protocol_class(header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
                   max_connections: int = MAX_CONNECTIONS, budget: ConnectionBudget | None = None) -> type[H11Protocol]:
    """uvicorn's h11 protocol with read deadlines, a connection cap and an untrusted-connection budget: a client that
    takes longer than `header_timeout_s` to send its request headers, or `body_timeout_s` to send its body, is
    disconnected; past `max_connections` open sockets a new one is closed at once; connections without credentials
    share `budget`'s slots. A client that half-closes its socket after sending its whole request still gets its
    answer (uvicorn would close the connection)."""
    budget = budget or ConnectionBudget()

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase: str | None = None
        _peer = None
        _half_closed = False
        _probe: asyncio.TimerHandle | None = None
        _probes_sent = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            self._peer = tuple(peer) if isinstance(peer, list | tuple) else None
            budget.opened(self._peer, transport)  # first: it may close an older untrusted one to make room
            if len(self.connections) - budget.num_closing > max_connections:
                log.warning("connection limit (%d) reached: closing a new connection", max_connections)
                transport.close()
                return
            self._arm("headers", header_timeout_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._half_closed:  # the client sends nothing more: the answer is out, close
                self.transport.close()
                return
            self._track()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._probe is not None:
                self._probe.cancel()
            budget.closed(self._peer)
            super().connection_lost(exc)

        def eof_received(self) -> bool | None:
            """The client shut down its sending side. Mid-request-body or between requests it is gone: close. After a
            whole request it may be a half-close (it still reads), or a full close: keep the socket open to answer,
            and tell the two apart by writing interim "100 Continue" lines (every client skips them) while no
            response has started: a closed socket answers with a reset, the next write fails, and the request sees
            a disconnect as before."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete or self.conn.their_state is not h11.DONE:
                return None
            self._half_closed = True
            self._send_probe()
            return True

        def _send_probe(self) -> None:
            self._probe = None
            cycle = self.cycle
            if self.transport.is_closing() or cycle is None or cycle.response_complete:
                return
            if not cycle.response_started:
                self.transport.write(INTERIM)
            delays = HALF_CLOSE_PROBE_S
            delay = delays[self._probes_sent] if self._probes_sent < len(delays) else 2.0
            self._probes_sent += 1
            self._probe = self.loop.call_later(delay, self._send_probe)

        def _track(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE:
                if self._phase != "headers" and self.conn.trailing_data[0]:  # a next request has begun
                    self._arm("headers", header_timeout_s)
                elif self._phase != "headers":
                    self._disarm()  # idle keep-alive: uvicorn's own keep-alive timeout applies
            elif state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body", body_timeout_s)
            else:
                self._disarm()

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._phase = None, None

        def _timed_out(self) -> None:
            phase, self._deadline, self._phase = self._phase, None, None
            if not self.transport.is_closing():
                log.info("closing a connection that was too slow to send its request %s", phase)
                self.transport.close()

    return DeadlineH11Protocol


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
