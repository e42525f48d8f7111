"""The models a studio process serves: load, swap and unload them while the UI and the API keep running.

A ModelManager holds named slots (ModelSlot), each serving at most one model through one pipeline. The "main"
slot is the one both front ends serve: the chat tab and the API hold it and ask it for the current pipeline per
request, so a model loaded from the UI's Model tab is the one the API serves, and their requests share one engine.
Another slot (the Compare tab's runs, say) loads and unloads without touching it. The manager's own load / unload
/ pipeline / current act on the main slot.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import loader
from engine.config import EngineConfig
from engine.errors import NoModelLoadedError  # noqa: F401 - re-exported
from engine.pipeline import Pipeline

MAIN_SLOT = "main"


@dataclass
class LoadedModel:
    pipeline: Pipeline
    path: Path
    name: str
    config: EngineConfig
    load_seconds: float
    is_demo: bool = False
    source: str = ""  # where the weights came from, when the app picked the model (the default model)


@dataclass
class ModelSlot:
    """One served model and its pipeline: the handle a tab or a route holds."""

    name: str = MAIN_SLOT
    recent: list[str] = field(default_factory=list)  # what this slot loaded, most recent first
    _current: LoadedModel | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def pipeline(self) -> Pipeline:
        current = self._current
        if current is None:
            raise NoModelLoadedError("no model is loaded: load one in the Model tab or pass MODEL to app.py")
        return current.pipeline

    @staticmethod
    def check(model: str | Path, config: EngineConfig | None = None) -> Path:
        """Cheap checks (path, config.json, architecture, weight format) that raise the errors a load would,
        without touching the loaded model. Returns the resolved folder."""
        config = config or EngineConfig()
        path = loader.resolve_model_path(model)
        spec = loader.read_model_spec(path, config.vision_tower)
        loader.detect_model_format(spec, config.model_format)
        if config.load_format != "dummy":
            loader.check_weights_present(path)
        return path

    def load(self, model: str | Path, config: EngineConfig | None = None, *, name: str | None = None,
             is_demo: bool = False, source: str = "") -> LoadedModel:
        """Load a model, replacing the current one. A model that fails the cheap checks (bad path, not a model
        folder, unsupported architecture) leaves the current one serving. Past those, the old one is shut down
        first so its memory is free; if the new one then fails to load, the error propagates and nothing is
        loaded."""
        self.check(model, config)
        with self._lock:
            self._unload_locked()
            start = time.monotonic()
            pipe = Pipeline(model, config or EngineConfig())
            loaded = LoadedModel(pipe, pipe.model_path, name or pipe.model_path.name, pipe.engine.config,
                                 time.monotonic() - start, is_demo, source)
            self._current = loaded
            key = str(model)
            self.recent = [key] + [r for r in self.recent if r != key][:9]
            return loaded

    def unload(self) -> None:
        with self._lock:
            self._unload_locked()

    def _unload_locked(self) -> None:
        if self._current is None:
            return
        self._current.pipeline.close()
        self._current = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


@dataclass
class ModelManager:
    """Named model slots; the main one is what the UI's chat and the API serve."""

    slots: dict[str, ModelSlot] = field(default_factory=lambda: {MAIN_SLOT: ModelSlot(MAIN_SLOT)})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def slot(self, name: str = MAIN_SLOT) -> ModelSlot:
        """The slot of that name, made empty on first use."""
        with self._lock:
            if name not in self.slots:
                self.slots[name] = ModelSlot(name)
            return self.slots[name]

    @property
    def main(self) -> ModelSlot:
        return self.slot(MAIN_SLOT)

    # ---- the main slot ----------------------------------------------------------------------------------------
    @property
    def recent(self) -> list[str]:
        return self.main.recent

    @property
    def current(self) -> LoadedModel | None:
        return self.main.current

    def pipeline(self) -> Pipeline:
        return self.main.pipeline()

    check = staticmethod(ModelSlot.check)

    def load(self, model: str | Path, config: EngineConfig | None = None, *, name: str | None = None,
             is_demo: bool = False, source: str = "") -> LoadedModel:
        return self.main.load(model, config, name=name, is_demo=is_demo, source=source)

    def unload(self) -> None:
        self.main.unload()

    def close(self) -> None:
        """Unload every slot's model (the main one included)."""
        for slot in list(self.slots.values()):
            slot.unload()
