"""Run an ASGI app under uvicorn on a background thread (tests, benchmarks, notebooks):

    with BackgroundServer(build_api(manager)) as server:
        httpx.get(server.url + "/health")

It binds 127.0.0.1 on a free port unless told otherwise, waits until the server accepts connections, and on exit
asks it to stop and joins the thread.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from api.server import uvicorn_options as hardened


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 startup_timeout_s: float = 30.0, **uvicorn_options):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        options = {"log_level": log_level, "lifespan": "off", "timeout_graceful_shutdown": 5, **hardened(),
                   **uvicorn_options}
        config = uvicorn.Config(app, **options)
        self.server = uvicorn.Server(config)
        self.startup_timeout_s = startup_timeout_s
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
