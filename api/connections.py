"""The HTTP protocol under the app: uvicorn's h11 protocol with header / body read deadlines, a cap on open
connections and a smaller budget for connections that have shown no credentials (slow or numerous clients cannot
hold the server's sockets), and a half-closed client still answered.

    uvicorn.Config(app, http=protocol_class(budget=ConnectionBudget(64)), ...)   # or api.uvicorn_options()
"""

from __future__ import annotations

import asyncio
import collections
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0  # from a connection's first byte (or a kept-alive one's next byte) to the end of its headers
BODY_TIMEOUT_S = 60.0  # from the end of the headers to the end of the body (32 MiB at ~4 Mbit/s)
MAX_CONNECTIONS = 1024  # open sockets; past it a new connection is closed at once
MAX_UNTRUSTED_CONNECTIONS = 64  # with a login / keys: sockets without credentials; past it one is closed


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
