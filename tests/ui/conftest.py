"""The studio app (API + Gradio UI) started in-process on a free port, once per session, with nothing loaded.

Tests load the demo model themselves (through the UI's events) so each one says what it relies on."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

import pytest


@dataclass
class Studio:
    url: str
    app: object
    manager: object
    quant_root: object


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def studio(demo_model_path, tmp_path_factory):
    import uvicorn

    import app as studio_app

    port = free_port()
    quant_root = tmp_path_factory.mktemp("quantized")
    args = studio_app.build_parser().parse_args([
        "--no-model", "--server-port", str(port), "--demo-model-dir", str(demo_model_path),
        "--quant-output-root", str(quant_root),
    ])
    app, manager = studio_app.create_app(args)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, name="studio-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the studio server did not start")
        time.sleep(0.05)
    yield Studio(f"http://127.0.0.1:{port}", app, manager, quant_root)
    # open event streams (gradio_client's heartbeat, browsers) are cut after the grace period: not an error here
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    server.should_exit = True
    thread.join(timeout=15)
    manager.unload()


@pytest.fixture(scope="session")
def client(studio):
    from gradio_client import Client

    client = Client(studio.url + "/", verbose=False)
    yield client
    client.close()  # ends its heartbeat stream, so the server shuts down at once


@pytest.fixture(scope="session")
def llava_path(tmp_path_factory):
    """A tiny random-weight LLaVA-1.5 (llava-hf layout, CLIP tower of 56 px: 16 image tokens per image)."""
    from tests.llava_factory import make_llava

    return make_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture
def image_file(tmp_path):
    """make(name, size=(w, h), seed) -> a PNG of random pixels (another seed: another image, never the same bytes)."""
    import numpy as np
    from PIL import Image

    def make(name: str = "cat.png", size=(40, 30), seed: int = 0):
        path = tmp_path / name
        pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(path)
        return path

    return make
