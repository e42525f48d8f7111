"""The one object the UI's event handlers share: the ModelManager (so the UI and the API serve one engine), the
settings the app was started with, the folders the Quantize tab produced, the Quantize and Compare background jobs
(studio/jobs.py: they outlive any browser tab) and the memory panel's rolling history. It is built once in app.py
and passed to every tab's build function."""

from __future__ import annotations

import collections
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.checkpoint import is_hub_id
from engine.config import EngineConfig
from studio.default_model import DefaultModel
from studio.demo_model import default_demo_model_dir
from studio.jobs import JobSlot
from studio.manager import ModelManager

MEMORY_HISTORY_SECONDS = 120  # the memory plot's rolling window


@dataclass
class StudioSettings:
    engine_config: EngineConfig = field(default_factory=EngineConfig)  # the Model tab's defaults (from CLI flags)
    demo_model_dir: Path = field(default_factory=default_demo_model_dir)
    quant_output_root: Path = field(default_factory=lambda: Path("quantized").resolve())
    api_keys_required: bool = False
    served_model_name: str | None = None
    root_path: str = ""
    server_port: int = 7860
    # None: any path. Otherwise (a server listening beyond loopback) model folders and calibration files must lie
    # under one of these roots, and quantized output under quant_output_root: no caller can read or write elsewhere.
    model_roots: tuple[Path, ...] | None = None
    # the real default model (studio/default_model.py) when the app found or made it; None: the demo model is it
    default_model: DefaultModel | None = None

    @property
    def default_model_path(self) -> Path:
        """What an empty model box loads: the real default model if there is one, else the demo model."""
        return self.default_model.path if self.default_model is not None else self.demo_model_dir

    def allowed_model_roots(self) -> tuple[Path, ...]:
        extra = (self.default_model.path,) if self.default_model is not None else ()
        return (*(self.model_roots or ()), self.demo_model_dir, *extra, self.quant_output_root)

    def check_model_path(self, path: str | Path) -> None:
        """The one policy for every path a UI route reads (Model, Quantize, Compare and its AWQ folder, calibration
        files): refuse one outside the configured roots before anything touches it, with one answer whether it
        exists or not. A hub id ("org/name") that is no local path passes: it goes to the Hugging Face cache."""
        if self.model_roots is None:
            return
        if is_hub_id(str(path)) and not Path(path).expanduser().exists():
            return
        if not _is_under(path, self.allowed_model_roots()):
            roots = ", ".join(str(r) for r in self.model_roots) or "none given (--model-dir)"
            raise PermissionError(f"model paths must be inside the model folders this server allows ({roots}), "
                                  "the demo model or the quantized output folder")

    def check_output_path(self, path: str | Path) -> None:
        if self.model_roots is not None and not _is_under(path, (self.quant_output_root,)):
            raise PermissionError(f"quantized models are written inside {self.quant_output_root} on this server")


def _is_under(path: str | Path, roots) -> bool:
    try:
        resolved = Path(path).expanduser().resolve()
        return any(resolved == r or resolved.is_relative_to(r) for r in (Path(r).expanduser().resolve()
                                                                           for r in roots))
    except (OSError, ValueError):
        return False


@dataclass
class StudioState:
    manager: ModelManager = field(default_factory=ModelManager)
    settings: StudioSettings = field(default_factory=StudioSettings)
    quantized_models: list[str] = field(default_factory=list)  # folders the Quantize tab wrote, newest first
    loading: str | None = None  # name of the model being loaded, for the header while the manager swaps models
    # the background jobs (studio/jobs.py): one of each kind at a time; the latest stays readable for any new tab
    quant_jobs: JobSlot = field(default_factory=lambda: JobSlot("quantization"))
    compare_jobs: JobSlot = field(default_factory=lambda: JobSlot("comparison"))
    compare_out_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="studio-compare-")))
    memory_history: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=MEMORY_HISTORY_SECONDS)
    )
    memory_recorder: Any = None  # studio.memory_history.MemoryRecorder filling memory_history (ui/memory_panel.py)
    compare_results: dict = field(default_factory=dict)  # resolved model path -> its last Compare run in a few words
    chat_stop_events: dict = field(default_factory=dict)  # browser session -> stop events of its running replies
    lock: threading.Lock = field(default_factory=threading.Lock)

    def is_default_path(self, path: str | Path) -> bool:
        """True for the real default model's folder (the app found or converted it at start)."""
        default = self.settings.default_model
        try:
            return default is not None and Path(path).expanduser().resolve() == default.path.resolve()
        except OSError:
            return False

    def is_demo_path(self, path: str | Path) -> bool:
        try:
            return Path(path).expanduser().resolve() == self.settings.demo_model_dir.expanduser().resolve()
        except OSError:
            return False

    def add_quantized(self, folder: str) -> None:
        with self.lock:
            self.quantized_models = [folder] + [f for f in self.quantized_models if f != folder][:19]

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, path) pairs for the model pickers: the default and demo models, quantized folders, recent loads."""
        demo = str(self.settings.demo_model_dir)
        choices, seen = [], {demo}
        real = self.settings.default_model
        if real is not None:
            choices.append((f"{real.name}  (default, real weights)", str(real.path)))
            seen.add(str(real.path))
        choices.append(("Demo model (random weights, built locally)", demo))
        for folder in self.quantized_models:
            if folder not in seen:
                choices.append((f"{Path(folder).name}  (quantized here)", folder))
                seen.add(folder)
        for model in self.manager.recent:
            if model not in seen and not self.is_demo_path(model):
                choices.append((f"{Path(model).name or model}  (recent)", model))
                seen.add(model)
        return choices
