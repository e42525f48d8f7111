"""What the image-model API tests share: a tiny checkpoint served by the real API on a background server with an
`openai` client pointed at it, a random PNG as a data URL, and a one-image chat message."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import openai
from PIL import Image


@contextmanager
def served(path: Path, name: str) -> Iterator[tuple[openai.OpenAI, object]]:
    """(openai client, the engine's pipeline) for the folder at `path`, served as model `name`."""
    from api import build_api
    from api.background import BackgroundServer
    from engine import EngineConfig
    from studio.manager import ModelManager

    mgr = ModelManager()
    mgr.load(path, EngineConfig(cache_block_seq_len=16, cpu_kv_cache_bytes=32 * 2**20), name=name)
    try:
        with BackgroundServer(build_api(mgr)) as srv:
            yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60), mgr.pipeline()
    finally:
        mgr.unload()


def png_url(h: int, w: int, seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in this picture?"}]}]
