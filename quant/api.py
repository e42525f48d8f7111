"""quantize_model: folder in, AutoAWQ-GEMM folder out. The CLI (`python -m quant`) and the UI both call this."""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.tokenizer import load_tokenizer
from quant.arch import linear_widths
from quant.awq import AWQConfig, as_progress, check_cancel, quantize_layers
from quant.calib_data import BUILTIN, check_calib_source, describe_calib_source, load_calib_samples
from quant.export import (
    DEFAULT_SHARD_BYTES,
    AWQStateCollector,
    check_output_dir,
    copy_side_files,
    quantization_config,
    source_weight_bytes,
    staged_output_dir,
    write_config,
    write_safetensors,
)
from quant.primitives import PACK_BITS
from quant.source_model import SourceModel, load_source_model, quant_text_config, read_config

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; pass --device cpu (slow)")
    return dev


def validate_settings(cfg: dict, w_bits: int, w_group_size: int) -> None:
    """Fails fast, before any weight is read: bit width the format can hold, group size dividing every width."""
    if w_bits != PACK_BITS:
        raise ValueError(
            f"--w-bits {w_bits} is not supported: the AutoAWQ GEMM format this tool writes (and the engine loads) "
            f"packs {PACK_BITS}-bit weights only"
        )
    if w_group_size == -1:
        return
    if w_group_size <= 0:
        raise ValueError(f"--w-group-size must be positive or -1 (one group per row), got {w_group_size}")
    try:
        widths = linear_widths(quant_text_config(cfg))
    except KeyError:
        return  # unusual config: the layer walk checks the real linears
    bad = {k: v for k, v in widths.items() if v % w_group_size}
    if bad:
        desc = ", ".join(f"{k} = {v}" for k, v in bad.items())
        fits = [g for g in GROUP_SIZES if all(v % g == 0 for v in widths.values())]
        hint = (f"pick a group size that divides them all (this model: {' or '.join(map(str, fits))})" if fits
                else "no usual group size divides them all: use -1 (one group per row)")
        raise ValueError(f"--w-group-size {w_group_size} does not divide the input width of every linear ({desc}); "
                         f"{hint}")


GROUP_SIZES = (128, 64, 32)  # the group sizes the tool offers, largest (smallest scale overhead) first


def fitting_group_sizes(cfg: dict) -> list[int]:
    """The offered group sizes that divide every linear's input width of this config (128 first, when it fits)."""
    try:
        widths = linear_widths(quant_text_config(cfg))
    except KeyError:
        return list(GROUP_SIZES)
    return [g for g in GROUP_SIZES if all(v % g == 0 for v in widths.values())]


def quantize_model(
    model_path: str | Path,
    work_dir: str | Path,
    *,
    calib_dataset: str = BUILTIN,
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    w_bits: int = 4,
    w_group_size: int = 128,
    search_scale: bool = False,
    clip: bool = True,
    method: str = "awq",
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress=None,
    cancel_event: threading.Event | Callable[[], bool] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    awq_options: dict | None = None,
) -> dict:
    """Quantize a Hugging Face checkpoint folder to W4A16 (AutoAWQ GEMM layout) in work_dir; returns the report.

    progress: an object with on_progress(stage, done, total, message) (or such a callable); stages are
    "load", "calibration", "quantize" (done = layers finished) and "export".
    cancel_event: set it (from another thread) to stop between layers with QuantizationCancelled.
    awq_options: extra AWQConfig fields (search_tokens, chunk_tokens, n_grid, ...).
    """
    t_start = time.perf_counter()
    cfg = AWQConfig(
        w_bits=w_bits,
        w_group_size=w_group_size,
        method=method,
        search_scale=search_scale,
        clip=clip,
        **(awq_options or {}),
    )
    src, src_cfg = read_config(model_path)
    validate_settings(src_cfg, w_bits, w_group_size)
    target = Path(work_dir).expanduser().resolve()
    if target == src.resolve():
        raise ValueError("--work-dir must differ from the model folder")
    check_output_dir(target, overwrite)
    dev = resolve_device(device)
    if cfg.method == "awq":
        check_calib_source(calib_dataset)
    prog = as_progress(progress)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    t0 = time.perf_counter()
    prog.on_progress("load", 0, 1, f"loading {src.name}")
    loaded = load_source_model(src, dtype, device=str(dev))
    prog.on_progress("load", 1, 1, f"{loaded.source_format} model, {loaded.dtype}")
    load_s = time.perf_counter() - t0
    check_cancel(cancel_event, "after loading the model")
    return quantize_loaded(
        loaded,
        target,
        cfg,
        calib_dataset=calib_dataset,
        calib_samples=calib_samples,
        calib_seqlen=calib_seqlen,
        device=dev,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        progress=prog,
        cancel_event=cancel_event,
        max_shard_bytes=max_shard_bytes,
        timings={"load": round(load_s, 3)},
        t_start=t_start,
    )


def quantize_loaded(
    loaded: SourceModel,
    work_dir: str | Path,
    cfg: AWQConfig,
    *,
    calib_dataset: str = BUILTIN,
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    samples: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress=None,
    cancel_event: threading.Event | Callable[[], bool] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    timings: dict | None = None,
    t_start: float | None = None,
) -> dict:
    """The steps after loading: calibration data, the layer walk, the folder. `loaded.model` is left holding the
    fake-quantized weights (the reference the written folder is checked against). `samples` (token ids
    [n, seqlen]) replaces the calibration dataset when given."""
    t_start = time.perf_counter() if t_start is None else t_start
    timings = dict(timings or {})
    prog = as_progress(progress)
    dev = torch.device(device)
    target = Path(work_dir).expanduser().resolve()
    check_output_dir(target, overwrite)

    def stage_done(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 3)

    if cfg.method == "awq" and samples is None:
        t0 = time.perf_counter()
        prog.on_progress("calibration", 0, 1, f"tokenizing {calib_dataset}")
        tokenizer = load_tokenizer(loaded.path, trust_remote_code=trust_remote_code)
        samples = load_calib_samples(calib_dataset, tokenizer, calib_samples, calib_seqlen)
        short = f" of the {calib_samples} asked for (the data ran out)" if samples.shape[0] < calib_samples else ""
        prog.on_progress("calibration", 1, 1, f"{samples.shape[0]} samples{short} x {samples.shape[1]} tokens")
        stage_done("calibration", t0)
        check_cancel(cancel_event, "after loading the calibration data")
    elif samples is not None:
        calib_dataset = "token ids given by the caller"
    if cfg.method == "rtn":
        samples = None

    t0 = time.perf_counter()
    collector = AWQStateCollector(loaded, cfg.w_bits)
    layer_stats = quantize_layers(
        loaded.model,
        loaded.arch,
        samples,
        cfg,
        device=dev,
        progress=prog,
        cancel=cancel_event,
        on_layer=collector.add_layer,
    )
    stage_done("quantize", t0)

    t0 = time.perf_counter()
    prog.on_progress("export", 0, 3, "collecting weights")
    with staged_output_dir(target, overwrite) as out:
        tensors = collector.finish(loaded.model)
        check_cancel(cancel_event, "before writing the output")
        prog.on_progress("export", 1, 3, "writing safetensors")
        files = write_safetensors(out, tensors, max_shard_bytes)
        quant_cfg = quantization_config(cfg.w_bits, cfg.w_group_size, collector.modules_to_not_convert(loaded.model))
        write_config(loaded.config, out, quant_cfg)
        copied = copy_side_files(loaded.path, out)
        if write_model_card(out, loaded.path, quant_cfg) and "README.md" not in copied:
            copied.append("README.md")
        prog.on_progress("export", 2, 3, "writing report")
        stage_done("export", t0)
        report = build_report(
            loaded,
            cfg,
            calib_dataset if samples is not None else None,
            samples,
            dev,
            layer_stats,
            timings,
            source_bytes=source_weight_bytes(loaded.path),
            output_bytes=sum(f.stat().st_size for f in files),
            files=[f.name for f in files] + copied,
            quant_cfg=quant_cfg,
            total_s=time.perf_counter() - t_start,
            calib_requested=(calib_samples, calib_seqlen) if samples is not None else (None, None),
        )
        report["work_dir"] = str(target)
        (out / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n")
        check_cancel(cancel_event, "before finishing the output folder")
    prog.on_progress("export", 3, 3, f"wrote {target}")
    return report


def write_model_card(out: Path, source: Path, quant_cfg: dict) -> bool:
    """README.md of the quantized folder: what it is (AWQ W4A16, group size, the format) on top, then the source
    folder's own README, if it had one, after a rule."""
    bits, group = quant_cfg.get("bits", 4), quant_cfg.get("group_size")
    head = (
        f"# {source.name}: AWQ W{bits}A16 (group size {group})\n\n"
        f"This folder is an **AWQ {bits}-bit weight quantization** of `{source.name}`, written by Quant Studio "
        "(`python -m quant` or its Quantize tab) in the AutoAWQ GEMM layout (`quantization_config` in config.json, "
        "`quant_report.json` for the settings and per-layer errors). Load it with the studio's engine, AutoAWQ, vLLM "
        "or `transformers`.\n"
    )
    readme = out / "README.md"
    original = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    if original:
        head += f"\nThe original model card of `{source.name}` follows.\n\n---\n\n{original}"
    readme.write_text(head, encoding="utf-8")
    return True


def build_report(
    loaded: SourceModel,
    cfg: AWQConfig,
    calib_dataset: str | None,
    samples: torch.Tensor | None,
    dev: torch.device,
    layer_stats: list,
    timings: dict,
    *,
    source_bytes: int,
    output_bytes: int,
    files: list[str],
    quant_cfg: dict,
    total_s: float,
    calib_requested: tuple[int | None, int | None] = (None, None),
) -> dict:
    import transformers

    layers = [s.as_dict() for s in layer_stats]
    ratios = [d["awq_over_rtn"] for d in layers if d.get("awq_over_rtn") is not None]
    summary = {
        "mean_awq_over_rtn_layer_mse": sum(ratios) / len(ratios) if ratios else None,
        "mean_layer_mse_awq": _mean(d.get("mse_awq") for d in layers),
        "mean_layer_mse_rtn": _mean(d.get("mse_rtn") for d in layers),
    }
    report = {
        "model": str(loaded.path),
        "source_format": loaded.source_format,
        "settings": {
            **{k: v for k, v in cfg.__dict__.items()},
            "calib_dataset": calib_dataset,
            "calib_samples": int(samples.shape[0]) if samples is not None else 0,
            "calib_seqlen": int(samples.shape[1]) if samples is not None else 0,
            "calib_samples_requested": calib_requested[0],
            "calib_seqlen_requested": calib_requested[1],
            "calib_source": describe_calib_source(calib_dataset) if calib_dataset and samples is not None else None,
            "device": str(dev),
            "dtype": str(loaded.dtype).replace("torch.", ""),
        },
        "quantization_config": quant_cfg,
        "timings_s": {**timings, "total": round(total_s, 3)},
        "sizes": {
            "source_weight_bytes": source_bytes,
            "output_weight_bytes": output_bytes,
            "compression": round(source_bytes / output_bytes, 3) if output_bytes else None,
        },
        "error_summary": summary,
        "layers": layers,
        "files": sorted(files),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    if dev.type == "cuda":
        report["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
    return report


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
