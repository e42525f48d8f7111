"""How long a quantization will take on this machine, measured before starting it: the real quantizer runs on the
real calibration data up to the end of its first layer, then stops (nothing is written). The whole run is then
about: load + calibration (as measured) + one layer's time x the number of layers. A quick setting's time is the
measured layer scaled by its share of calibration tokens (AWQ's work per layer grows with samples x tokens)."""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

QUICK_SETTING = (8, 256)  # samples x tokens: rough scales, minutes instead of a quarter hour on a CPU


@dataclass
class QuantEstimate:
    setup_seconds: float  # loading the model and the calibration data
    layer_seconds: float  # the first decoder layer, as measured
    num_layers: int
    samples: int
    seqlen: int

    @property
    def total_seconds(self) -> float:
        return self.setup_seconds + self.layer_seconds * self.num_layers

    def scaled_seconds(self, samples: int, seqlen: int) -> float:
        """The run with another calibration size: setup as measured, each layer in proportion to its tokens."""
        share = (samples * seqlen) / max(1, self.samples * self.seqlen)
        return self.setup_seconds + self.layer_seconds * share * self.num_layers


class _FirstLayer:
    """A progress sink that notes when the layers start and when the first one ends, then asks the run to stop."""

    def __init__(self):
        self.cancel = threading.Event()
        self.t0 = time.perf_counter()
        self.layers_start: float | None = None
        self.first_layer: float | None = None
        self.num_layers = 0

    def on_progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        if stage != "quantize":
            return
        now = time.perf_counter()
        if self.layers_start is None:
            self.layers_start = now
            self.num_layers = total
        if done >= 1 and self.first_layer is None:
            self.first_layer = now
            self.cancel.set()


def estimate_quantization(model_path: str | Path, *, calib_samples: int, calib_seqlen: int, cancel=None,
                          **quantize_kwargs) -> QuantEstimate:
    """Time the first layer of quantize_model(model_path, ...) with these settings; raises what the quantizer
    raises for bad input (the same message the real run would give). `cancel`: an Event that stops the estimate."""
    from quant import quantize_model  # lazy: quant's public names load torch and transformers on first use

    probe = _FirstLayer()
    stop = lambda: probe.cancel.is_set() or (cancel is not None and cancel.is_set())  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="quant-estimate-") as tmp:
        try:
            quantize_model(model_path, Path(tmp) / "out", calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                           progress=probe, cancel_event=stop, **quantize_kwargs)
        except Exception as e:  # the stop after the first layer is the expected way out
            if type(e).__name__ != "QuantizationCancelled" or probe.first_layer is None:
                raise
    if probe.first_layer is None or probe.layers_start is None:
        raise RuntimeError("the quantizer finished without reporting a layer: nothing to time")
    return QuantEstimate(setup_seconds=probe.layers_start - probe.t0,
                         layer_seconds=probe.first_layer - probe.layers_start, num_layers=probe.num_layers,
                         samples=int(calib_samples), seqlen=int(calib_seqlen))
