"""The memory panel's history, recorded on the server: a daemon thread takes a reading every few seconds for as
long as the app runs, so the plot covers the last minutes whether or not a page was open (before, readings were
only taken while a page polled, and the plot drew a straight line across the gap)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("studio.memory")


class MemoryRecorder:
    """Calls `sample()` every `every_s` seconds on a daemon thread from start() until stop(). A failing reading is
    logged once per kind of failure and the next one is tried: the recorder never stops on its own."""

    def __init__(self, sample: Callable[[], object], every_s: float = 1.0, name: str = "memory-history"):
        if every_s <= 0:
            raise ValueError(f"every_s must be positive, got {every_s}")
        self.sample, self.every_s, self.name = sample, every_s, name
        self.samples_taken = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MemoryRecorder:
        if not self.running:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
                self.samples_taken += 1
            except Exception as e:  # noqa: BLE001 - a reading that fails now may work next time
                error = f"{type(e).__name__}: {e}"
                if error != self.last_error:
                    log.warning("memory reading failed: %s", error)
                self.last_error = error
            self._stop.wait(self.every_s)
