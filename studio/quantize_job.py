"""The Quantize tab's work as a background job (studio/jobs.py): quant.quantize_model, then the before/after
quality check (studio/quality.py: perplexity, KL divergence and top-1 against 16-bit, per held-out text), with
progress in words (layer x of N, stage) and an ETA from finished layers (quant.api.WorkEta). Cancel stops the
quantizer between steps; nothing half-written is left behind."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import EngineError
from quant.api import quantize_model
from studio.jobs import Job, JobSlot, WorkEta
from studio.quality import quantization_check

log = logging.getLogger("studio.quantize")

STAGE_SPAN = {"load": (0.0, 0.08), "calibration": (0.08, 0.12), "quantize": (0.12, 0.9), "export": (0.9, 0.93),
              "quality": (0.93, 1.0)}
STAGE_LABEL = {"load": "Loading the model", "calibration": "Preparing calibration data", "quantize": "Quantizing",
               "export": "Writing the quantized folder", "quality": "Measuring quality before / after (held-out texts)"}


@dataclass
class QuantizeOutcome:
    model_path: str
    report: dict  # quant.quantize_model's report (work_dir, sizes, timings, settings, layers, error_summary)
    quality: dict | None  # before/after quality (quantization_check), {"error": ...}, or None when not asked
    calibration: str | None  # what the calibration stage really got, in words
    history: list[tuple[str, int, int]]  # every (stage, done, total) the quantizer reported, for the record


class QuantizeProgress:
    """quant's progress protocol, on_progress(stage, done, total, message), as the job's fraction, words and ETA."""

    def __init__(self, job: Job):
        self.job, self.eta = job, WorkEta()
        self.calibration: str | None = None
        self.history: list[tuple[str, int, int]] = []  # every (stage, done, total) reported, for the record

    def on_progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        total = max(total, 1)
        if stage == "quantize":
            self.eta.update(done, total)
        if stage == "calibration" and done >= total and message:
            self.calibration = message
        self.history.append((stage, done, total))
        lo, hi = STAGE_SPAN.get(stage, (0.0, 1.0))
        self.job.report(lo + (hi - lo) * min(1.0, done / total), describe(stage, done, total, message),
                        self.eta.seconds_left() if stage == "quantize" else None,
                        detail={"stage": stage, "done": done, "total": total})


def describe(stage: str, done: int, total: int, message: str) -> str:
    if stage == "quantize":
        step = re.sub(r"^layer \d+/\d+:?\s*", "", message or "")
        return f"Layer {min(done + 1, total)} of {total} · {step or 'working'}"
    label = STAGE_LABEL.get(stage, stage)
    return f"{label} · {message}" if message else label


def start_quantize(slot: JobSlot, model_path: str, work_dir: str, kwargs: dict, check_quality: bool = True,
                   on_done: Callable[[QuantizeOutcome], None] | None = None) -> Job:
    """Start quantizing `model_path` into `work_dir` in the background (JobBusyError while another one runs).
    on_done(outcome) runs in the job once the folder is written (whether or not a browser tab still watches)."""

    def work(job: Job) -> QuantizeOutcome:
        progress = QuantizeProgress(job)
        try:
            report = quantize_model(model_path, work_dir, progress=progress, cancel_event=job.cancelled, **kwargs)
        except Exception as e:
            _log_failure(f"quantizing {model_path!r}", e)
            raise
        quality = _measure_quality(job, progress, model_path, report["work_dir"]) if check_quality else None
        outcome = QuantizeOutcome(model_path, report, quality, progress.calibration, progress.history)
        if on_done is not None:
            on_done(outcome)
        return outcome

    return slot.start(work, title=f"{model_path} → {work_dir}")


def _measure_quality(job: Job, progress: QuantizeProgress, source: str, quantized: str) -> dict:
    """Before/after perplexity of what was just written; a failure here (no memory left for a second model, say)
    is reported next to the result, it does not undo the finished folder."""
    try:
        return quantization_check(source, quantized, cancelled=job.cancelled.is_set,
                                  progress=lambda done, total, message: progress.on_progress("quality", done, total,
                                                                                             message))
    except Exception as e:  # noqa: BLE001 - shown in the summary
        _log_failure(f"measuring the perplexity of {quantized!r}", e)
        return {"error": f"{type(e).__name__}: {e}"}


def _log_failure(what: str, e: BaseException) -> None:
    """One INFO line for an error the user can fix (or a cancel); the traceback only for a fault in the program."""
    if isinstance(e, (EngineError, ValueError, OSError)):
        log.info("%s stopped: %s", what, e)
    else:
        log.error("%s failed", what, exc_info=e)
