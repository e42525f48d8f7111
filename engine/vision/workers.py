"""The image workers: a small thread pool that builds requests holding images (load, hash, decode, preprocess,
tokenize) off the asyncio event loop, so a huge image never stalls the loop, `/health`, or a text request.

Admission is bounded twice, at submission, before any image is read: the images queued or being prepared (count)
and an upper bound of their encoded bytes (engine/media.py's `encoded_size`). Beyond either, ImagesBusyError
(HTTP 429) says to retry; nothing waits unboundedly. Decoded pixels exist only inside a worker, so at most
`image_workers` images are decoded at once (a 40-megapixel image is 120 MB as RGB); the prepared pixels then wait
in the RequestInput, which the engine's own admission bounds.

A slot is freed when the work ends, not when its caller stops waiting: a cancelled request's image still counts
until its worker is done with it (or is dropped from the queue before it starts).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from engine.errors import EngineStoppedError, ImagesBusyError


class ImageWorkers:
    def __init__(self, num_workers: int, max_images: int, max_bytes: int):
        self.max_images, self.max_bytes = max_images, max_bytes
        self.executor = ThreadPoolExecutor(num_workers, thread_name_prefix="image-worker")
        self._lock = threading.Lock()
        self.images_in_flight = 0
        self.bytes_in_flight = 0
        self.num_refused = 0

    def submit(self, fn: Callable, *args, num_images: int, num_bytes: int) -> Future:
        """Queue fn(*args) on a worker, or raise ImagesBusyError when the images would exceed a bound."""
        with self._lock:
            too_many = self.images_in_flight + num_images > self.max_images and self.images_in_flight > 0
            too_big = self.bytes_in_flight + num_bytes > self.max_bytes and self.bytes_in_flight > 0
            if too_many or too_big:
                self.num_refused += 1
                what = (f"{self.images_in_flight} images" if too_many else
                        f"{self.bytes_in_flight / 2**20:.0f} MiB of images")
                raise ImagesBusyError(f"the server is preparing {what} right now; retry in a moment")
            self.images_in_flight += num_images
            self.bytes_in_flight += num_bytes
        try:
            future = self.executor.submit(fn, *args)
        except RuntimeError as e:  # shut down: the model was unloaded or swapped while this request came in
            self._release(num_images, num_bytes)
            raise EngineStoppedError("the model was unloaded while the request arrived; retry") from e
        except BaseException:
            self._release(num_images, num_bytes)
            raise
        future.add_done_callback(lambda _: self._release(num_images, num_bytes))
        return future

    async def run(self, fn: Callable, *args, num_images: int, num_bytes: int):
        """fn(*args) on a worker, awaited; cancelling the await drops the work if it has not started."""
        future = self.submit(fn, *args, num_images=num_images, num_bytes=num_bytes)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def _release(self, num_images: int, num_bytes: int) -> None:
        with self._lock:
            self.images_in_flight -= num_images
            self.bytes_in_flight -= num_bytes

    def stats(self) -> dict:
        with self._lock:
            return {"images_in_flight": self.images_in_flight, "image_bytes_in_flight": self.bytes_in_flight,
                    "images_refused_busy": self.num_refused}

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
