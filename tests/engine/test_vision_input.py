"""The image path's bookkeeping on a tiny LLaVA-1.5 (CPU): an image's content hash comes before any work, so the same
image sent again is neither decoded nor preprocessed, skips the tower (encoder cache) and reuses its prefix blocks;
a request input built once (off the event loop, on the image workers) serves several requests; the image workers
refuse work beyond their bounds with ImagesBusyError. Everything is counted by the engine's own counters."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

from engine.errors import ImagesBusyError
from engine.vision.workers import ImageWorkers
from tests.engine.conftest import greedy
from tests.llava_factory import make_llava


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    return make_llava(tmp_path_factory.mktemp("llava15") / "llava-1.5")


def data_url(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(70, 90, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def turn(url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text",
                                                                                          "text": text}]}


def test_a_repeated_image_skips_decoding_the_tower_and_its_prefix(llava15, make_pipe):
    pipe = make_pipe(llava15)
    blocks = pipe.engine.block_manager
    url = data_url(1)
    first = [turn(url, "What is in this picture? Describe it in detail.")]
    reply = pipe(first, greedy(4))
    m0, hits0 = pipe.memory(), blocks.num_prefix_hits
    assert m0["images_decoded"] == 1 and m0["encoder_cache_misses"] == 1 and m0["image_memo_entries"] == 1
    # the next turn resends the image (as the Chat tab and OpenAI clients do), with a new question after the reply
    second = first + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And the colours?"}]
    request_input = pipe.prompt_input(second)
    item = request_input.mm_items[0]
    pipe(second, greedy(4))
    m1 = pipe.memory()
    assert m1["images_decoded"] == 1 and m1["image_memo_hits"] >= 2  # prompt_input above, and the run
    assert m1["encoder_cache_misses"] == 1  # the tower did not run again: every full block up to the image's end
    assert blocks.num_prefix_hits - hits0 >= item.end // 16  # came from the prefix cache
    # behind another prefix (a system prompt first: no block shared), the image's features come from the encoder cache
    hits1 = blocks.num_prefix_hits
    pipe([{"role": "system", "content": "Be brief."}] + first, greedy(4))
    m2 = pipe.memory()
    assert blocks.num_prefix_hits == hits1
    assert m2["encoder_cache_hits"] == m1["encoder_cache_hits"] + 1 and m2["encoder_cache_misses"] == 1
    assert m2["images_decoded"] == 1
    # the same pixels as a PIL image (a Python caller): hashed from its pixels, so also decoded-free the second time
    img = Image.fromarray((np.random.RandomState(2).rand(50, 60, 3) * 255).astype("uint8"))
    a = pipe.prompt_input(("Hi", img))
    b = pipe.prompt_input(("Hi", img.copy()))
    assert a.mm_items[0].content_hash == b.mm_items[0].content_hash
    assert a.mm_items[0].pixel_values is b.mm_items[0].pixel_values  # the memo's prepared pixels
    assert pipe.prompt_input(("Hi", Image.fromarray(np.asarray(img)[::-1].copy()))).mm_items[0].content_hash != \
        a.mm_items[0].content_hash


def test_one_built_input_serves_several_requests(llava15, make_pipe):
    pipe = make_pipe(llava15)
    messages = [turn(data_url(3), "Describe.")]

    async def main():
        request_input = await pipe.build_input(messages)  # on the image workers, off this loop
        streams = [pipe.generate(None, greedy(3), input_ids=request_input) for _ in range(3)]

        async def drain(stream):
            return [out async for out in stream]

        return await asyncio.gather(*(drain(s) for s in streams))

    runs = asyncio.run(main())
    assert all(outs[-1].finished and outs[-1].finish_reason == "length" for outs in runs)
    assert pipe.memory()["images_decoded"] == 1


def test_image_workers_refuse_beyond_their_bounds():
    workers = ImageWorkers(num_workers=1, max_images=3, max_bytes=1000)
    gate = threading.Event()
    try:
        running = workers.submit(gate.wait, 30, num_images=2, num_bytes=400)
        with pytest.raises(ImagesBusyError, match="preparing 2 images"):
            workers.submit(lambda: None, num_images=2, num_bytes=10)
        with pytest.raises(ImagesBusyError, match="MiB of images"):
            workers.submit(lambda: None, num_images=1, num_bytes=700)
        queued = workers.submit(lambda: "ok", num_images=1, num_bytes=600)  # fits both bounds: queued behind
        assert workers.stats()["images_in_flight"] == 3 and workers.stats()["images_refused_busy"] == 2
        gate.set()
        assert running.result(timeout=30) is True and queued.result(timeout=30) == "ok"
        # slots free when the work ends; a lone request larger than the bounds is still served (nothing else runs)
        big = workers.submit(lambda: "big", num_images=5, num_bytes=5000)
        assert big.result(timeout=30) == "big"
    finally:
        gate.set()
        workers.shutdown()


def test_a_full_image_queue_is_images_busy_for_build_input(llava15, make_pipe):
    pipe = make_pipe(llava15, max_images_in_flight=1, image_workers=1)
    gate = threading.Event()
    blocker = pipe.image_workers.submit(gate.wait, 30, num_images=1, num_bytes=1)
    try:
        with pytest.raises(ImagesBusyError):
            asyncio.run(pipe.build_input([turn(data_url(4), "Hi")]))
        assert asyncio.run(pipe.build_input("text only goes by")) is not None  # text never waits for images
    finally:
        gate.set()
        blocker.result(timeout=30)
    assert asyncio.run(pipe.build_input([turn(data_url(4), "Hi")])).num_images == 1


def test_image_workers_after_shutdown_say_the_engine_stopped():
    from engine.errors import EngineStoppedError

    workers = ImageWorkers(num_workers=1, max_images=4, max_bytes=100)
    workers.shutdown()
    with pytest.raises(EngineStoppedError, match="unloaded"):
        workers.submit(lambda: None, num_images=1, num_bytes=1)
    assert workers.stats()["images_in_flight"] == 0
