"""The API under test: the demo model loaded in a ModelManager, served by build_api under uvicorn on a background
thread (127.0.0.1, a free port), once per session. Extra servers (API keys, a tiny concurrency limit) share the
same manager, so every test talks to one engine."""

from __future__ import annotations

import json
import time

import httpx
import pytest

SESSION_LEN = 512  # small, so "prompt too long" is cheap to provoke
MODEL_NAME = "demo"


@pytest.fixture(scope="session")
def manager(demo_model_path):
    from engine import EngineConfig
    from studio.manager import ModelManager

    mgr = ModelManager()
    mgr.load(demo_model_path, EngineConfig(cache_block_seq_len=16, cpu_kv_cache_bytes=64 * 2**20,
                                           session_len=SESSION_LEN), name=MODEL_NAME, is_demo=True)
    yield mgr
    mgr.unload()


@pytest.fixture(scope="session")
def pipe(manager):
    return manager.pipeline()


@pytest.fixture(scope="session")
def server(manager):
    from api import build_api
    from api.background import BackgroundServer

    with BackgroundServer(build_api(manager)) as srv:
        yield srv


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return server.url


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def sse_events(response: httpx.Response) -> list:
    """The decoded `data:` events of an SSE response, "[DONE]" kept as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_until_idle(pipe, timeout_s: float = 20.0) -> dict:
    """Poll until the engine runs nothing and holds no KV block; return its memory report."""
    deadline = time.monotonic() + timeout_s
    while True:
        mem = pipe.memory()
        if pipe.engine.num_running == 0 and pipe.engine.num_waiting == 0 and mem["used_kv_blocks"] == 0:
            return mem
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout_s} s: running {pipe.engine.num_running}, "
                                 f"waiting {pipe.engine.num_waiting}, used blocks {mem['used_kv_blocks']}")
        time.sleep(0.05)
