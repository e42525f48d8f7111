"""Side-by-side memory, speed and quality of one model under several settings (the Compare tab's runner).

    python -m studio.compare MODEL --settings fp16,w4a16,w4a16-kv8,w4a16-kv4 --awq-model AWQ_FOLDER \
        --session-len 2048 4096 --cache-max-entry-count 0.8 0.4 --out results/compare

A setting is WEIGHTS[-kvN]: WEIGHTS one of fp16, bf16, fp32, auto (16-bit: the model folder) or w4a16 (the AWQ
folder: --awq-model, or --quantize to make one with the quant tool first); -kv8 / -kv4 quantize the KV cache
(quant_policy 8 / 4). Each (setting, session length, cache fraction) runs in a fresh child process, so its memory
numbers are its own; a child that fails (out of memory, bad folder, unsupported setting) reports its error in its
row and the other rows still run. MODEL may be `shape:llama2-7b` (studio/workload.py SHAPES): a config-only
folder with random weights at the real shape (load_format=dummy), W4A16 included: nothing to download.

Per row: the planner's prediction (studio/planner.py), then measured: memory after load and peak during the
workload (NVML for this process on a GPU; on CPU the process RSS, labelled so), the engine's breakdown, KV capacity
and max sessions of session_len, batch-1 decode tok/s, throughput at --concurrency, first-token latency,
quality on the held-out texts of the Quantize tab's check (studio/quality.py, one scoring path): perplexity per
text, KL divergence against the 16-bit model (mean, p99) and top-1 agreement, and a fixed greedy reply next to the
16-bit setting's one. The 16-bit reference is scored once (by the first 16-bit, unquantized-KV setting, which then
runs first, or by a quality-only child when there is none) and saved as top-k logprobs per position (a few hundred
KB); every setting is compared against it.

Before the run the planner says which settings can fit (printed, and in the markdown); after it, one verdict line
names the fastest setting (throughput at --concurrency) that meets the constraints: --gpu-memory-gb (measured peak),
--sessions x its session length (measured max_sessions) and --max-kld (mean KL divergence over every text).
Output: JSON, markdown and a PNG of grouped bar charts in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.config import EngineConfig
from quant.errors import QuantizationCancelled
from studio.demo_model import is_demo_model
from studio.jobs import Job, JobSlot, WorkEta
from studio.workload import SHAPES, RequestTimer, make_shape_folder, markdown_table

KV_POLICIES = {"": 0, "kv8": 8, "kv4": 4}
WEIGHT_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "auto": "auto", "w4a16": "auto"}
SHAPE_PREFIX = "shape:"
GREEDY_PROMPT = "Explain in two sentences why the sky is blue."
MEMORY_PARTS = ("weights", "kv_cache", "activations", "cuda_graphs", "other")
COLUMNS = ["setting", "session_len", "cache_max_entry_count", "status", "pred_weights_GiB", "weights_GiB",
           "pred_kv_cache_GiB", "kv_cache_GiB", "pred_kv_capacity_tokens", "kv_capacity_tokens", "pred_max_sessions",
           "max_sessions", "pred_total_GiB", "memory_after_load_GiB", "memory_peak_GiB", "decode_tok_s",
           "throughput_tok_s", "ttft_ms", "perplexity", "kld_mean", "kld_p99", "top1", "greedy_match", "error"]
QUALITY_COLUMNS = ["setting", "session_len", "cache_max_entry_count", "text", "tokens", "ppl", "kld_mean", "kld_p99",
                   "top1"]
DEFAULT_MAX_KLD = 0.05  # mean KL divergence (nats) a setting may cost to pass the verdict
GIB = 1024**3


@dataclass(frozen=True)
class Setting:
    name: str
    weights: str  # fp16 | bf16 | fp32 | auto | w4a16
    quant_policy: int

    @property
    def is_w4a16(self) -> bool:
        return self.weights == "w4a16"

    @property
    def dtype(self) -> str:
        return WEIGHT_DTYPES[self.weights]


def parse_setting(text: str) -> Setting:
    name = text.strip().lower()
    weights, _, kv = name.partition("-")
    if weights not in WEIGHT_DTYPES or kv not in KV_POLICIES:
        raise ValueError(f"unknown setting {text!r}: use WEIGHTS[-kv8|-kv4], WEIGHTS one of "
                         f"{', '.join(WEIGHT_DTYPES)} (e.g. fp16, w4a16-kv4)")
    return Setting(name, weights, KV_POLICIES[kv])


def parse_settings(text: str | list[str]) -> list[Setting]:
    items = text.split(",") if isinstance(text, str) else list(text)
    settings = [parse_setting(s) for s in items if s.strip()]
    if not settings:
        raise ValueError("give at least one setting (e.g. fp16,w4a16-kv4)")
    return settings


@dataclass
class Workload:
    prompt_len: int = 128
    new_tokens: int = 64
    concurrency: int = 8
    max_batch_size: int = 128
    device: str = "auto"

    def __post_init__(self):
        for name in ("prompt_len", "new_tokens", "concurrency", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")


@dataclass
class SettingRun:
    """One child run: a setting at one session length and cache fraction, on one folder."""

    setting: Setting
    session_len: int | None
    cache_max_entry_count: float
    model_path: str | None  # None: the setting has no folder (its error is in `error`)
    load_format: str = "auto"
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.setting.name} @ {self.session_len or 'max'} / {self.cache_max_entry_count:g}"


@dataclass
class CompareSpec:
    model: str
    settings: list[Setting]
    session_lens: list[int | None] = field(default_factory=lambda: [None])
    cache_max_entry_counts: list[float] = field(default_factory=lambda: [0.8])
    awq_model: str | None = None
    workload: Workload = field(default_factory=Workload)
    gpu_memory_gb: float | None = None  # for the planner when there is no local GPU to read; None: the local one
    cpu_kv_cache_bytes: int | None = None  # CPU only: the engine's KV budget (EngineConfig.cpu_kv_cache_bytes)
    sessions: int = 1  # the verdict's constraint: this many sessions of each row's session length at once
    max_kld: float = DEFAULT_MAX_KLD  # the verdict's constraint: the largest acceptable mean KL divergence

    def __post_init__(self):
        for n in self.session_lens:
            if n is not None and (not isinstance(n, int) or n < 2):
                raise ValueError(f"session lengths must be whole numbers of at least 2, got {n!r}")
        for f in self.cache_max_entry_counts:
            if not 0.0 < float(f) <= 1.0:
                raise ValueError(f"cache_max_entry_count must be in (0, 1], got {f}")
        if not self.session_lens or not self.cache_max_entry_counts:
            raise ValueError("give at least one session length and one cache_max_entry_count")
        if not isinstance(self.sessions, int) or self.sessions < 1:
            raise ValueError(f"sessions must be a whole number of at least 1, got {self.sessions!r}")
        if not float(self.max_kld) >= 0:
            raise ValueError(f"the largest acceptable KL divergence must be 0 or more, got {self.max_kld!r}")


# ---- folders -------------------------------------------------------------------------------------------------
def resolve_folders(spec: CompareSpec, work_dir: Path, quantize: bool = False,
                    on_progress: Callable[[str, float], None] | None = None,
                    cancel_event: threading.Event | None = None) -> tuple[str, str | None, str, str | None]:
    """(16-bit folder, AWQ folder or None, load_format, why there is no AWQ folder)."""
    if spec.model.startswith(SHAPE_PREFIX):
        shape = spec.model[len(SHAPE_PREFIX):]
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
        base = make_shape_folder(shape, work_dir)
        awq = make_shape_folder(shape, work_dir, awq_group_size=128) if any(s.is_w4a16 for s in spec.settings) \
            else None
        return str(base), str(awq) if awq else None, "dummy", None
    if spec.awq_model:
        return spec.model, spec.awq_model, "auto", None
    if not any(s.is_w4a16 for s in spec.settings):
        return spec.model, None, "auto", None
    if not quantize:
        return spec.model, None, "auto", ("W4A16 needs an AWQ folder: pass --awq-model PATH, or --quantize to make "
                                          "one with the quant tool first")
    return spec.model, quantize_on_the_way(spec.model, work_dir / "awq", on_progress, cancel_event), "auto", None


def quantize_on_the_way(model: str, out: Path, on_progress=None, cancel_event=None) -> str:
    """AWQ-quantize `model` into `out` with the quant tool (built-in calibration text), reporting progress."""
    import torch  # lazy: torch and the quantizer load only when a run needs them (fast --help, light UI import)

    from quant.api import quantize_model  # lazy: as torch above

    samples, seqlen = (128, 2048) if torch.cuda.is_available() else (16, 256)

    class Progress:
        def on_progress(self, stage, done, total, message=""):
            if on_progress is not None:
                on_progress(f"quantize: {stage} {message}".strip(), done / max(total, 1))

    quantize_model(model, out, calib_samples=samples, calib_seqlen=seqlen, progress=Progress(),
                   cancel_event=cancel_event, overwrite=True)
    return str(out)


def make_jobs(spec: CompareSpec, base: str, awq: str | None, load_format: str,
              awq_error: str | None) -> list[SettingRun]:
    jobs = []
    for setting in spec.settings:
        for session_len in spec.session_lens:
            for fraction in spec.cache_max_entry_counts:
                folder = awq if setting.is_w4a16 else base
                error = awq_error if setting.is_w4a16 and awq is None else None
                jobs.append(SettingRun(setting, session_len, float(fraction), folder, load_format, error))
    return jobs


# ---- prediction ----------------------------------------------------------------------------------------------
def predict(job: SettingRun, spec: CompareSpec, device: str) -> dict:
    """The planner's numbers for one job (instant: reads config.json only)."""
    from studio.planner import PlanSettings, plan_memory  # lazy: torch (fast --help)

    if job.model_path is None:
        raise ValueError(job.error or "no folder for this setting")
    settings = PlanSettings(
        weights="w4a16" if job.setting.is_w4a16 else "16bit", dtype=job.setting.dtype,
        quant_policy=job.setting.quant_policy, cache_max_entry_count=job.cache_max_entry_count,
        session_len=job.session_len, max_batch_size=spec.workload.max_batch_size, device=device,
        gpu_memory_gb=spec.gpu_memory_gb if device == "cuda" else None,
        cpu_kv_cache_bytes=spec.cpu_kv_cache_bytes or EngineConfig.cpu_kv_cache_bytes)
    return plan_memory(job.model_path, settings)


def predict_rows(spec: CompareSpec, device: str | None = None, quantize: bool = False) -> list[dict]:
    """Predicted rows for every job, errors in their rows. quantize: W4A16 rows are planned from the 16-bit
    config (group 128), as the quantizer will write them."""
    device = device or _device_name(spec.workload.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base, awq, load_format, awq_error = resolve_folders(spec, Path(tmp), quantize=False)
        except Exception as e:  # noqa: BLE001 - shown as the rows' error
            return [{"setting": s.name, "status": "error", "error": _error_text(e)} for s in spec.settings]
        if awq is None and quantize:
            awq, awq_error = base, None
        for job in make_jobs(spec, base, awq, load_format, awq_error):
            row = {"setting": job.setting.name, "session_len": job.session_len,
                   "cache_max_entry_count": job.cache_max_entry_count}
            try:
                row.update(_prediction_columns(predict(job, spec, device)))
                row["status"] = "predicted"
            except Exception as e:  # noqa: BLE001
                row.update(status="error", error=_error_text(e))
            rows.append(row)
    return rows


def _prediction_columns(plan: dict) -> dict:
    return {
        "pred_weights_bytes": plan["weights_bytes"], "pred_weights_GiB": plan["weights_bytes"] / GIB,
        "pred_kv_bytes_per_token": plan["kv_bytes_per_token"],
        "pred_kv_cache_GiB": plan["kv_cache_bytes"] / GIB, "pred_kv_capacity_tokens": plan["kv_capacity_tokens"],
        "pred_max_sessions": plan["max_sessions"], "pred_total_GiB": plan["predicted_total_bytes"] / GIB,
        "pred_fits": plan["fits"], "pred_fits_note": plan["fits_note"],
        "pred_workspace_GiB": plan["workspace_bytes_estimate"] / GIB,
        "pred_cuda_graphs_GiB": plan["cuda_graph_bytes_estimate"] / GIB,
        "pred_other_GiB": plan["cuda_context_bytes_estimate"] / GIB,
    }


def _device_name(device: str) -> str:
    if device != "auto":
        return device
    import torch  # lazy: fast --help

    return "cuda" if torch.cuda.is_available() else "cpu"


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ---- the child -----------------------------------------------------------------------------------------------
class PeakSampler:
    """Samples this process's memory (NVML on GPU, RSS on CPU) every `interval` s on a thread; keeps the peak."""

    def __init__(self, read: Callable[[], int | None], interval: float = 0.01):
        self.read, self.interval = read, interval
        self.peak = read() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            value = self.read()
            if value:
                self.peak = max(self.peak, value)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        value = self.read()
        if value:
            self.peak = max(self.peak, value)


def process_memory_reader(device: str) -> tuple[Callable[[], int | None], str]:
    """(read bytes of this process, what it measures): NVML per-process on a GPU, else the process RSS."""
    from engine.memory import cpu_snapshot, gpu_snapshot  # lazy: torch, in the child only

    if device == "cuda":
        snap = gpu_snapshot()
        if snap["available"] and snap["gpus"] and snap["gpus"][0]["process_bytes"] is not None:
            import torch

            index = torch.cuda.current_device()

            def read_gpu():
                gpus = gpu_snapshot()["gpus"]
                return next((g["process_bytes"] for g in gpus if g["index"] == index), None)

            return read_gpu, "GPU memory of this process (NVML)"
        import torch

        return (lambda: torch.cuda.memory_reserved()), "GPU memory reserved by torch (NVML has no per-process view)"
    return (lambda: cpu_snapshot()["process_rss_bytes"]), "CPU memory: process RSS (no GPU)"


def run_child(job: dict, emit: Callable[[dict], None]) -> dict:
    """Everything measured for one job, in this (fresh) process. `emit` gets progress dicts."""
    import random

    import torch  # lazy: the child process is the one that loads torch and the engine

    from engine import GenerationConfig, pipeline  # lazy: as torch above
    from studio.quality import Scoring, quality_figures, score_texts  # lazy: as torch above

    torch.manual_seed(0)
    wl = job["workload"]
    device = _device_name(wl["device"])
    read_memory, memory_kind = process_memory_reader(device)
    emit({"stage": "load", "fraction": 0.05})
    t0 = time.perf_counter()
    cfg = dict(quant_policy=job["quant_policy"], cache_max_entry_count=job["cache_max_entry_count"],
               session_len=job["session_len"], max_batch_size=wl["max_batch_size"], dtype=job["dtype"],
               load_format=job["load_format"], device=device, enable_prefix_caching=False,
               model_format="awq" if job["is_w4a16"] else "hf")
    if job.get("cpu_kv_cache_bytes"):
        cfg["cpu_kv_cache_bytes"] = job["cpu_kv_cache_bytes"]
    pipe = pipeline(job["model_path"], EngineConfig(**cfg))
    out = {"load_s": time.perf_counter() - t0, "memory_kind": memory_kind, "device": device}

    def quality():  # the Quantize tab's check: same texts, same scoring; against the saved 16-bit top-k
        scorings = score_texts(pipe)
        if job.get("write_reference"):
            torch.save({name: s.to_dict() for name, s in scorings.items()}, job["reference_path"])
        reference = None
        if job.get("reference_path") and os.path.exists(job["reference_path"]):
            reference = {name: Scoring.from_dict(d) for name, d in torch.load(job["reference_path"]).items()}
        figures = quality_figures(scorings, reference)
        prose = figures.get("prose") or next(iter(figures.values()))
        out.update(quality=figures, perplexity=prose["ppl"], perplexity_tokens=prose["num_tokens"],
                   perplexity_window=prose["num_tokens"] + 1)
        out.update({k: figures.get("all", {}).get(k) for k in ("kld_mean", "kld_p99", "top1")})

    if job.get("reference_only"):
        try:
            emit({"stage": "scoring the 16-bit reference", "fraction": 0.3})
            quality()
            emit({"stage": "done", "fraction": 1.0})
            return out
        finally:
            pipe.close()
    try:
        mem = pipe.memory()
        out["memory_after_load_bytes"] = read_memory()
        eng, spec = pipe.engine, pipe.engine.spec
        session_len = pipe.session_len
        vocab = spec.vocab_size
        rng = random.Random(0)
        timer = RequestTimer(eng)
        prompt_len = min(wl["prompt_len"], session_len - wl["new_tokens"] - 1, eng.capacity_tokens - 1)
        if prompt_len < 1:
            raise ValueError(f"prompt_len + new_tokens must fit in session_len {session_len}")

        def ids(n):
            return [rng.randrange(3, vocab) for _ in range(n)]

        with PeakSampler(read_memory) as peak:
            emit({"stage": "warm-up", "fraction": 0.15})
            timer.run([(ids(min(16, prompt_len)), 4)], 1)
            emit({"stage": "quality", "fraction": 0.25})
            quality()
            reply = pipe(GREEDY_PROMPT, GenerationConfig(max_new_tokens=min(32, wl["new_tokens"]), do_sample=False,
                                                         ignore_eos=True))
            out["greedy_text"], out["greedy_token_ids"] = reply.text, reply.token_ids
            emit({"stage": "batch-1 decode", "fraction": 0.45})
            r1 = timer.run([(ids(prompt_len), wl["new_tokens"])], 1)
            out["ttft_ms"] = r1["ttft_p50_ms"]
            out["decode_tok_s"] = 1e3 / r1["tpot_p50_ms"] if r1["tpot_p50_ms"] > 0 else None
            emit({"stage": f"throughput at concurrency {wl['concurrency']}", "fraction": 0.7})
            rc = timer.run([(ids(prompt_len), wl["new_tokens"]) for _ in range(wl["concurrency"])],
                           wl["concurrency"])
            out["throughput_tok_s"] = rc["output_tokens_per_s"]
            out["concurrent_ttft_p50_ms"] = rc["ttft_p50_ms"]
        out["memory_peak_bytes"] = peak.peak
        mem = pipe.memory()
        out["engine_memory"] = mem
        out["session_len"] = session_len
        out["max_sessions"] = mem["num_kv_blocks"] // -(-session_len // mem["block_size"])
        # random weights (the demo model, or a shape: folder loaded with dummy weights): quality means nothing
        out["is_demo"] = is_demo_model(job["model_path"]) or job["load_format"] == "dummy"
        emit({"stage": "done", "fraction": 1.0})
    finally:
        pipe.close()
    return out


def child_main(job_json: str) -> int:
    """`python -m studio.compare --child JOB_JSON`: one JSON line per progress step, then the result line."""
    def emit(msg):
        print(json.dumps({"progress": msg}), flush=True)

    try:
        result = run_child(json.loads(job_json), emit)
        print(json.dumps({"result": result}, default=str), flush=True)
        return 0
    except BaseException as e:  # noqa: BLE001 - the parent shows it in the row
        import traceback

        traceback.print_exc()
        print(json.dumps({"error": _error_text(e)}), flush=True)
        return 1


# ---- the parent ----------------------------------------------------------------------------------------------
class Cancelled(Exception):
    pass


class ChildRunner:
    """Runs one job in a fresh `python -m studio.compare --child` process; cancel() kills its process group."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.cancel_event = threading.Event()
        self._lock = threading.Lock()

    def cancel(self) -> None:
        self.cancel_event.set()
        with self._lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self, payload: dict, on_progress: Callable[[str, float], None], timeout_s: float | None = None) -> dict:
        if self.cancel_event.is_set():
            raise Cancelled("cancelled")
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "studio.compare", "--child", json.dumps(payload)]
        stderr = tempfile.TemporaryFile(mode="w+")
        with self._lock:
            self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                         start_new_session=True)
        proc = self.proc
        timer = threading.Timer(timeout_s, self.cancel) if timeout_s else None
        if timer:
            timer.start()
        result, error = None, None
        try:
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "progress" in msg:
                    on_progress(msg["progress"]["stage"], msg["progress"]["fraction"])
                elif "result" in msg:
                    result = msg["result"]
                elif "error" in msg:
                    error = msg["error"]
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            with self._lock:
                self.proc = None
        if self.cancel_event.is_set():
            raise Cancelled("cancelled: the child process was killed")
        if result is None:
            stderr.seek(0)
            tail = stderr.read()[-2000:].strip().splitlines()
            error = error or (f"the child process died (exit code {rc}"
                              + (", killed: out of memory?" if rc in (-9, 137) else "") + ")"
                              + (f": {tail[-1]}" if tail else ""))
            raise ChildError(error)
        return result


class ChildError(Exception):
    pass


def measured_columns(result: dict) -> dict:
    mem = result["engine_memory"]
    row = {
        "weights_bytes": mem["weights_bytes"], "weights_GiB": mem["weights_bytes"] / GIB,
        "kv_bytes_per_token": mem["kv_bytes_per_token"], "kv_cache_GiB": mem["kv_cache_bytes"] / GIB,
        "kv_capacity_tokens": mem["kv_capacity_tokens"], "max_sessions": result["max_sessions"],
        "session_len": result["session_len"], "memory_kind": result["memory_kind"],
        "memory_after_load_GiB": (result.get("memory_after_load_bytes") or 0) / GIB,
        "memory_peak_GiB": (result.get("memory_peak_bytes") or 0) / GIB,
        "decode_tok_s": result.get("decode_tok_s"), "throughput_tok_s": result.get("throughput_tok_s"),
        "ttft_ms": result.get("ttft_ms"), "perplexity": result.get("perplexity"),
        "kld_mean": result.get("kld_mean"), "kld_p99": result.get("kld_p99"), "top1": result.get("top1"),
        "quality": result.get("quality"),
        "perplexity_tokens": result.get("perplexity_tokens"), "perplexity_window": result.get("perplexity_window"),
        "greedy_text": result.get("greedy_text"), "greedy_token_ids": result.get("greedy_token_ids"),
        "load_s": result.get("load_s"), "device": result.get("device"), "is_demo": result.get("is_demo"),
    }
    parts = {p: None for p in MEMORY_PARTS}
    parts["weights"] = mem["weights_bytes"]
    parts["kv_cache"] = mem["kv_cache_bytes"]
    if "part_activations_bytes" in mem:
        parts.update(activations=mem["part_activations_bytes"], cuda_graphs=mem["part_cuda_graph_bytes"],
                     other=mem["part_other_bytes"])
    else:  # CPU: RSS after load minus what the engine holds (the KV cache is committed only as it is used)
        rss = result.get("memory_after_load_bytes") or 0
        parts.update(activations=None, cuda_graphs=0, other=max(0, rss - mem["weights_bytes"] - mem["kv_cache_bytes"]))
    row.update({f"{p}_part_GiB": (v / GIB if v is not None else None) for p, v in parts.items()})
    return row


def add_quality_columns(rows: list[dict]) -> None:
    """greedy_match: tokens equal to the first 16-bit, unquantized-KV row's reply (same session / fraction)."""
    refs = [r for r in rows if r.get("status") == "ok" and not r["setting"].startswith("w4a16")
            and "-kv" not in r["setting"]]
    ref = refs[0] if refs else None
    for r in rows:
        if r.get("status") != "ok" or ref is None:
            continue
        a, b = r.get("greedy_token_ids") or [], ref.get("greedy_token_ids") or []
        same = sum(1 for _ in iter_equal_prefix(a, b))
        r["greedy_match"] = f"{same}/{len(b)}" + (" (reference)" if r is ref else "")
        r["reference_greedy_text"] = ref.get("greedy_text")
    if any(r.get("is_demo") for r in rows):
        for r in rows:
            r["quality_note"] = "random weights (demo model or shape:): perplexity and replies are meaningless"


def iter_equal_prefix(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def run_compare(spec: CompareSpec, out_dir: Path | None = None, *, quantize: bool = False,
                on_progress: Callable[[int, int, str, str, float], None] | None = None,
                on_row: Callable[[dict], None] | None = None, runner: ChildRunner | None = None,
                timeout_s: float | None = None) -> dict:
    """Run every job; returns {'rows': [...], 'device': ..., ...} and writes JSON / markdown / PNG to out_dir.

    on_progress(job index, job count, job label, stage, fraction of that job); on_row(row) after each job.
    runner.cancel() from another thread kills the running child and stops (rows so far are kept)."""
    runner = runner or ChildRunner()
    device = _device_name(spec.workload.device)
    result = {"model": spec.model, "device": device, "rows": [], "cancelled": False,
              "workload": asdict(spec.workload), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    work = Path(tempfile.mkdtemp(prefix="compare-"))
    try:
        def quant_progress(stage, fraction):
            if on_progress:
                on_progress(0, 0, "AWQ quantization", stage, fraction)

        try:
            base, awq, load_format, awq_error = resolve_folders(spec, work, quantize, quant_progress,
                                                                runner.cancel_event)
        except Exception as e:  # noqa: BLE001 - quantizing failed or was cancelled: the W4A16 rows say so
            if isinstance(e, QuantizationCancelled):
                result["cancelled"] = True
                return result
            base, awq, load_format, awq_error = spec.model, None, "auto", f"quantizing failed: {_error_text(e)}"
        jobs = make_jobs(spec, base, awq, load_format, awq_error)
        reference_path = str(work / "reference-16bit.pt")
        ref_index = next((i for i, j in enumerate(jobs) if j.error is None and not j.setting.is_w4a16
                          and j.setting.quant_policy == 0), None)
        if ref_index is not None:  # that setting's child scores and saves the 16-bit reference: it runs first
            jobs.insert(0, jobs.pop(ref_index))
            result["reference"] = jobs[0].label
        elif any(j.error is None for j in jobs):  # no 16-bit setting: a quality-only child scores the reference
            result["reference"] = f"{Path(base).name} (16-bit, quality only)"
            ref_job = SettingRun(parse_setting("auto"), None, 0.2, base, load_format)
            try:
                runner.run({**_payload(ref_job, spec), "reference_only": True, "reference_path": reference_path,
                            "write_reference": True},
                           lambda stage, fraction: on_progress and on_progress(0, len(jobs), "16-bit reference",
                                                                               stage, fraction), timeout_s)
            except Cancelled:
                result["cancelled"] = True
                return result
            except Exception as e:  # noqa: BLE001 - the rows still run, without KL divergence
                result["reference_error"] = str(e) if isinstance(e, ChildError) else _error_text(e)
        plan_rows = []
        for index, job in enumerate(jobs):
            row = {"setting": job.setting.name, "session_len": job.session_len,
                   "cache_max_entry_count": job.cache_max_entry_count, "model_path": job.model_path}
            try:
                row.update(_prediction_columns(predict(job, spec, device)))
            except Exception as e:  # noqa: BLE001
                row["prediction_error"] = _error_text(e)
            failed = job.error or row.get("prediction_error")
            plan_rows.append(dict(row, status="error" if failed else "predicted", error=failed))
            result["plan_fit"] = plan_fit_lines(plan_rows, spec.sessions)
            if job.error:
                row.update(status="error", error=job.error)
            else:
                payload = {**_payload(job, spec), "reference_path": reference_path,
                           "write_reference": index == 0 and ref_index is not None}

                def progress(stage, fraction, index=index, job=job):
                    if on_progress:
                        on_progress(index, len(jobs), job.label, stage, fraction)

                try:
                    progress("starting a fresh process", 0.0)
                    row.update(measured_columns(runner.run(payload, progress, timeout_s)))
                    row["status"] = "ok"
                except Cancelled:
                    row.update(status="cancelled", error="cancelled")
                    result["rows"].append(row)
                    result["cancelled"] = True
                    break
                except Exception as e:  # noqa: BLE001 - the row shows it; the next setting still runs
                    row.update(status="error", error=str(e) if isinstance(e, ChildError) else _error_text(e))
            if row.get("pred_weights_bytes") is not None and row.get("weights_bytes") is not None:
                row["weights_bytes_match"] = row["pred_weights_bytes"] == row["weights_bytes"]
            result["rows"].append(row)
            if on_row:
                on_row(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_quality_columns(result["rows"])
    result["memory_kind"] = next((r["memory_kind"] for r in result["rows"] if r.get("memory_kind")), None)
    result["constraints"] = {"gpu_memory_gb": spec.gpu_memory_gb, "sessions": spec.sessions,
                             "max_kld": spec.max_kld}
    result["verdict"] = verdict(result["rows"], spec, device)
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    return result


def _payload(job: SettingRun, spec: CompareSpec) -> dict:
    return {"model_path": job.model_path, "quant_policy": job.setting.quant_policy, "dtype": job.setting.dtype,
            "is_w4a16": job.setting.is_w4a16, "session_len": job.session_len,
            "cache_max_entry_count": job.cache_max_entry_count, "load_format": job.load_format,
            "workload": asdict(spec.workload), "cpu_kv_cache_bytes": spec.cpu_kv_cache_bytes}


# ---- the verdict ---------------------------------------------------------------------------------------------
def _row_label(r: dict) -> str:
    return f"{r['setting']} @ {r.get('session_len') or 'max'} / {r.get('cache_max_entry_count', 0):g}"


def constraints_text(spec: CompareSpec, device: str) -> str:
    memory = (f"peak memory <= {spec.gpu_memory_gb:g} GB" if spec.gpu_memory_gb and device == "cuda"
              else "runs on this machine")
    return (f"the constraints ({memory}; {spec.sessions} session(s) at its session length; mean KL divergence "
            f"<= {spec.max_kld:g})")


def _misses(r: dict, spec: CompareSpec, device: str) -> str | None:
    """Why a measured row fails the constraints (None: it meets them)."""
    if r.get("status") != "ok":
        return r.get("status") or "not measured"
    if spec.gpu_memory_gb and device == "cuda" and (r.get("memory_peak_GiB") or 0) * GIB > spec.gpu_memory_gb * 1e9:
        return f"peak {r['memory_peak_GiB']:.2f} GiB > {spec.gpu_memory_gb:g} GB"
    if (r.get("max_sessions") or 0) < spec.sessions:
        return f"{r.get('max_sessions')} sessions of {r.get('session_len')} tokens < {spec.sessions}"
    if r.get("is_demo"):  # random weights: the divergence means nothing, the verdict rests on speed and memory
        return None
    if r.get("kld_mean") is None:
        return "KL divergence not measured (no 16-bit reference)"
    if r["kld_mean"] > spec.max_kld:
        return f"mean KLD {r['kld_mean']:.4f} > {spec.max_kld:g}"
    return None


def verdict(rows: list[dict], spec: CompareSpec, device: str) -> dict:
    """{"setting": the label of the fastest row (throughput, then batch-1 decode) that meets the constraints, or
    None, "line": one sentence with the measured numbers behind it}."""
    passing = [r for r in rows if _misses(r, spec, device) is None]
    wanted = constraints_text(spec, device)
    if not passing:
        why = "; ".join(f"{_row_label(r)}: {_misses(r, spec, device)}" for r in rows) or "nothing measured"
        return {"setting": None, "line": f"Verdict: no setting meets {wanted} ({why})."}
    best = max(passing, key=lambda r: (r.get("throughput_tok_s") or 0, r.get("decode_tok_s") or 0))
    top1 = f", top-1 {100 * best['top1']:.1f}%" if best.get("top1") is not None else ""
    line = (f"Verdict: {_row_label(best)} is the fastest setting that meets {wanted}: "
            f"throughput {best.get('throughput_tok_s') or 0:.1f} tok/s, "
            f"batch-1 decode {best.get('decode_tok_s') or 0:.1f} tok/s, "
            f"peak {best.get('memory_peak_GiB') or 0:.2f} GiB, {best.get('max_sessions')} sessions fit, "
            f"mean KLD {best.get('kld_mean') or 0:.4f} (p99 {best.get('kld_p99') or 0:.4f}){top1}, "
            f"perplexity {best.get('perplexity') or 0:.2f} ({len(passing)} of {len(rows)} settings qualify"
            + ("; random weights: KL divergence not judged" if best.get("is_demo") else "") + ").")
    return {"setting": _row_label(best), "line": line}


def plan_fit_lines(rows: list[dict], sessions: int = 1) -> list[str]:
    """The planner's per-setting answer before a run: can it fit at all (memory, and `sessions` sessions)?"""
    lines = []
    for r in rows:
        if r.get("status") == "error":
            lines.append(f"{_row_label(r)}: cannot run ({r.get('error')})")
        elif not r.get("pred_fits"):
            lines.append(f"{_row_label(r)}: does not fit ({r.get('pred_fits_note')})")
        elif (r.get("pred_max_sessions") or 0) < sessions:
            lines.append(f"{_row_label(r)}: fits, but only {r.get('pred_max_sessions')} of {sessions} sessions")
        else:
            lines.append(f"{_row_label(r)}: fits ({r.get('pred_total_GiB') or 0:.2f} GiB predicted, "
                         f"{r.get('pred_max_sessions')} sessions)")
    return lines


# ---- as a background job (the Compare tab) ---------------------------------------------------------------------
@dataclass
class CompareOutcome:
    result: dict  # run_compare's result (rows, device, memory_kind, cancelled ...)
    files: list[str]  # compare.json, compare.md, compare.png


def start_compare(slot: JobSlot, spec: CompareSpec, out_dir: Path, quantize: bool = False) -> Job:
    """Run `spec` in the background (studio/jobs.py): each setting in its own child process; cancel() kills the
    running child. Progress: the running setting and its stage, each setting's last stage (detail), an ETA from
    the settings finished (WorkEta), or from the fraction done before the first one ends."""
    runner = ChildRunner()

    def work(job: Job) -> CompareOutcome:
        eta, stages = WorkEta(), {}

        def on_progress(index, count, label, stage, fraction):
            stages[label] = (stage, fraction)
            if not count:  # quantizing first: no setting has started
                job.report(None, f"{label}: {stage}", None, detail=dict(stages))
                return
            eta.update(index, count)
            overall = (index + fraction) / count
            left = eta.seconds_left()
            elapsed = job.snapshot().elapsed_s
            if left is None and overall > 0.02:
                left = elapsed * (1 - overall) / overall
            job.report(overall, f"{label}: {stage} (setting {index + 1} of {count})", left, detail=dict(stages))

        result = run_compare(spec, out_dir, quantize=quantize, on_progress=on_progress, runner=runner)
        return CompareOutcome(result, [str(Path(out_dir) / n) for n in ("compare.json", "compare.md", "compare.png")])

    return slot.start(work, on_cancel=runner.cancel,
                      title=f"{spec.model}: {', '.join(s.name for s in spec.settings)}")


# ---- outputs -------------------------------------------------------------------------------------------------
def to_markdown(result: dict) -> str:
    lines = [f"# Compare: {result['model']} on {result['device']}", ""]
    if result.get("memory_kind"):
        lines += [f"Memory after load / peak: {result['memory_kind']}.", ""]
    if result.get("verdict"):
        lines += [result["verdict"]["line"], ""]
    if result.get("plan_fit"):
        lines += ["Planner, before the run:", ""] + [f"- {x}" for x in result["plan_fit"]] + [""]
    rows = [{c: ("" if r.get(c) is None else r.get(c)) for c in COLUMNS} for r in result["rows"]]
    lines.append(markdown_table(rows, COLUMNS))
    per_text = quality_rows(result["rows"])
    if per_text:
        ref = result.get("reference") or "none"
        lines += ["", f"Quality by held-out text (first tokens of each; KL divergence against the 16-bit reference: "
                      f"{ref}; from top-20 logprobs, studio/quality.py states the approximation):", "",
                  markdown_table(per_text, QUALITY_COLUMNS)]
    if result.get("reference_error"):
        lines += ["", f"The 16-bit reference failed: {result['reference_error']}"]
    notes = {r.get("quality_note") for r in result["rows"] if r.get("quality_note")}
    lines += [""] + [f"Note: {n}." for n in notes]
    return "\n".join(lines) + "\n"


def quality_rows(rows: list[dict]) -> list[dict]:
    """One row per (setting, held-out text): tokens, perplexity, KL divergence mean / p99, top-1 agreement."""
    out = []
    for r in rows:
        for text, q in (r.get("quality") or {}).items():
            if text == "all":
                continue
            out.append({"setting": r["setting"], "session_len": r.get("session_len"),
                        "cache_max_entry_count": r.get("cache_max_entry_count"), "text": text,
                        "tokens": q.get("num_tokens"), "ppl": q.get("ppl"), "kld_mean": q.get("kld_mean", ""),
                        "kld_p99": q.get("kld_p99", ""), "top1": q.get("top1", "")})
    return out


def chart_png(result: dict, path: Path) -> Path:
    """Four panels, one x tick per measured row: memory stacked by part (measured, with the planner's total as a
    marker), decode and throughput tok/s, perplexity per held-out text, mean KL divergence against 16-bit (p99 as a
    marker, top-1 agreement written above). Legends sit below their panel, so no bar is covered."""
    import matplotlib  # lazy: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    labels = [f"{r['setting']}\n{r['session_len']} / {r['cache_max_entry_count']:g}" for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(max(16, 2.8 * len(rows) + 8), 5.4), layout="constrained")
    x = list(range(len(rows)))
    colors = {"weights": "#059669", "kv_cache": "#f59e0b", "activations": "#6366f1", "cuda_graphs": "#0ea5e9",
              "other": "#94a3b8"}
    bottom = [0.0] * len(rows)
    for part in MEMORY_PARTS:
        values = [r.get(f"{part}_part_GiB") or 0.0 for r in rows]
        axes[0].bar(x, values, bottom=bottom, color=colors[part], label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    pred = [r.get("pred_total_GiB") for r in rows]
    if any(p is not None for p in pred):
        axes[0].scatter(x, [p or 0 for p in pred], marker="_", s=600, color="black", label="predicted total")
    axes[0].set_title("memory by part (GiB)" + (", CPU RSS" if result.get("device") == "cpu" else ""), fontsize=10)
    width = 0.4
    axes[1].bar([i - width / 2 for i in x], [r.get("decode_tok_s") or 0 for r in rows], width, label="batch-1 decode")
    axes[1].bar([i + width / 2 for i in x], [r.get("throughput_tok_s") or 0 for r in rows], width,
                label=f"throughput @ {result['workload']['concurrency']}")
    axes[1].set_title("tokens / s", fontsize=10)
    texts = list(dict.fromkeys(t for r in rows for t in (r.get("quality") or {}) if t != "all"))
    palette = ["#ec4899", "#8b5cf6", "#14b8a6", "#f97316", "#64748b"]
    width = 0.8 / max(1, len(texts))
    for j, text in enumerate(texts):
        axes[2].bar([i - 0.4 + width * (j + 0.5) for i in x],
                    [((r.get("quality") or {}).get(text) or {}).get("ppl") or 0 for r in rows], width,
                    color=palette[j % len(palette)], label=text)
    demo = any(r.get("is_demo") for r in rows)
    axes[2].set_title("perplexity by held-out text" + ("\n(random weights: meaningless)" if demo else ""),
                      fontsize=10)
    kld = [r.get("kld_mean") or 0 for r in rows]
    axes[3].bar(x, kld, color="#ec4899", label="mean")
    axes[3].scatter(x, [r.get("kld_p99") or 0 for r in rows], marker="_", s=600, color="black", label="p99")
    for i, r in enumerate(rows):
        if r.get("top1") is not None:
            axes[3].annotate(f"top-1 {100 * r['top1']:.1f}%", (i, r.get("kld_p99") or kld[i]), ha="center",
                             va="bottom", fontsize=7, xytext=(0, 4), textcoords="offset points")
    axes[3].set_title("KL divergence vs 16-bit (nats)", fontsize=10)
    axes[3].margins(y=0.15)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "compare.json", "markdown": out_dir / "compare.md", "png": out_dir / "compare.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    paths["markdown"].write_text(to_markdown(result))
    chart_png(result, paths["png"])
    return paths


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(f"{w}{kv}" for w in WEIGHT_DTYPES for kv in ("", "-kv8", "-kv4"))
    parser = argparse.ArgumentParser(
        prog="python -m studio.compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2].strip(),
        epilog=f"valid --settings names: {names}\n(fp16 / bf16 / fp32 / auto: the 16-bit model folder in that dtype; "
               "w4a16: the AWQ folder; -kv8 / -kv4: int8 / int4 KV cache)\n\n"
               "example:\n  python -m studio.compare /models/llama2-7b --awq-model /models/llama2-7b-awq "
               "--settings fp16,w4a16,w4a16-kv4 --session-len 2048 4096")
    parser.add_argument("model", help="the model folder (16-bit), an AWQ folder for w4a16-only runs, or shape:NAME for "
                                      f"random weights at a real shape ({', '.join(SHAPES)})")
    parser.add_argument("--settings", default="fp16,w4a16,w4a16-kv8,w4a16-kv4",
                        help="comma-separated settings to compare, WEIGHTS[-kv8|-kv4] (default: %(default)s)")
    parser.add_argument("--awq-model", default=None,
                        help="the AWQ (W4A16) folder of the same model, for the w4a16 settings")
    parser.add_argument("--quantize", action="store_true",
                        help="no AWQ folder: make one first with the quant tool (AWQ, built-in calibration text)")
    parser.add_argument("--session-len", type=int, nargs="+", default=[None],
                        help="session lengths in tokens, each a run of its own (default: the model's maximum)")
    parser.add_argument("--cache-max-entry-count", type=float, nargs="+", default=[0.8],
                        help="fractions of the memory free after loading given to the KV cache, each a run of its own "
                             "(default: 0.8)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="tokens generated per request (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="requests in flight for the throughput figure (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=128,
                        help="the engine's max_batch_size (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="where the runs go (default: auto, the GPU when there is one)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="the GPU size the planner's prediction assumes (default: this machine's GPU)")
    parser.add_argument("--cpu-kv-cache-bytes", type=int, default=None,
                        help="CPU only: the engine's KV-cache budget in bytes (default: the engine's)")
    parser.add_argument("--sessions", type=int, default=1,
                        help="the verdict's constraint: sessions of each session length at once (default: 1)")
    parser.add_argument("--max-kld", type=float, default=DEFAULT_MAX_KLD,
                        help="the verdict's constraint: the largest acceptable mean KL divergence against the "
                             "16-bit model, over every held-out text (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per setting before its process is killed (default: none)")
    parser.add_argument("--out", type=Path, default=Path("compare-results"),
                        help="folder for compare.json, compare.md and compare.png (default: %(default)s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child_main(sys.argv[2])
    args = parser.parse_args(argv)
    try:
        spec = CompareSpec(args.model, parse_settings(args.settings), args.session_len, args.cache_max_entry_count,
                           args.awq_model, Workload(args.prompt_len, args.new_tokens, args.concurrency,
                                                    args.max_batch_size, device=args.device),
                           args.gpu_memory_gb, args.cpu_kv_cache_bytes, args.sessions, args.max_kld)
    except ValueError as e:
        parser.error(str(e))
    print("Planner, before the run:")
    for line in plan_fit_lines(predict_rows(spec, quantize=args.quantize), spec.sessions):
        print(f"- {line}")
    sys.stdout.flush()
    from tqdm import tqdm  # lazy: only a real run draws the bar

    bar = tqdm(total=1000, unit="‰", desc="compare", dynamic_ncols=True)

    def progress(index, count, label, stage, fraction):
        done = (index + fraction) / count if count else fraction * 0.0
        bar.n = int(1000 * done)
        bar.set_description(f"{label}: {stage}" if count else stage)
        bar.refresh()

    runner = ChildRunner()
    try:
        result = run_compare(spec, args.out, quantize=args.quantize, on_progress=progress, runner=runner,
                             timeout_s=args.timeout)
    except KeyboardInterrupt:
        runner.cancel()
        bar.close()
        print("cancelled", file=sys.stderr)
        return 130
    bar.n = 1000
    bar.close()
    print(to_markdown(result))
    print(f"written: {args.out}/compare.json, compare.md, compare.png")
    return 0 if all(r.get("status") == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
