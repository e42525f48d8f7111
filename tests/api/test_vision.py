"""/v1/chat/completions with image_url parts on a vision-language model (a tiny LLaVA-1.5): data URLs are served,
bad images and refused sources are 400s with the engine's message."""

from __future__ import annotations

import base64
import io

import httpx
import pytest


@pytest.fixture(scope="module")
def llava_url(tmp_path_factory):
    from api import build_api
    from api.background import BackgroundServer
    from engine import EngineConfig
    from studio.manager import ModelManager
    from tests.llava_factory import make_llava

    mgr = ModelManager()
    mgr.load(make_llava(tmp_path_factory.mktemp("llava") / "llava"),
             EngineConfig(cache_block_seq_len=16, cpu_kv_cache_bytes=32 * 2**20), name="llava")
    try:
        with BackgroundServer(build_api(mgr)) as srv:
            yield srv.url
    finally:
        mgr.unload()


def _png_url() -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(60, 80, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(base_url: str, url: str, **extra) -> httpx.Response:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is it?"}]}]
    body = {"model": "llava", "messages": messages, "max_tokens": 6, "temperature": 0, **extra}
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60)


def test_chat_with_an_image(llava_url):
    r = _ask(llava_url, _png_url())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] > 16  # 16 image tokens
    r = _ask(llava_url, _png_url(), stream=True)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(("url", "words"), [
    ("data:image/png;base64,AAAA", "not an image"),
    ("http://127.0.0.1:9/cat.png", "--allow-media-urls"),
    ("/etc/hostname", "local image paths are not allowed"),
])
def test_bad_images_are_400(llava_url, url, words):
    r = _ask(llava_url, url)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
