"""AWQ quantizer at Llama-2-7B shape with random fp16 weights: wall time and peak GPU memory per stage.

    python benchmarks/bench_awq.py --out benchmarks/results/awq_llama2_7b            # the full run, on CUDA
    python benchmarks/bench_awq.py --num-layers 4 --out /tmp/awq_quick               # a quick check
    python benchmarks/bench_awq.py --shape tiny --device cpu --out /tmp/awq_tiny     # smoke test without a GPU

Targets (128 x 2048 calibration tokens, scale and clip search, on one GPU): < 5 min, peak GPU memory < 8 GiB.

The model is built in memory, not read from disk: the LlamaForCausalLM skeleton on the meta device, CPU storage
allocated with to_empty, and each tensor drawn on the GPU and copied down (seconds, where writing and re-reading
13 GB of safetensors would take minutes). Calibration tokens are random ids (time does not depend on them). The
quantization then goes through the same entry point as `python -m quant` (quant.api.quantize_loaded), including
writing the ~3.9 GB AutoAWQ folder to a temporary directory; per-step figures come from the progress callback:
at each event the GPU is synchronised, the time since the previous event and the peak allocated memory since then
are booked to the step that just ended, and the peak counter is reset.
Writes <out>.json and <out>.md (or bench_awq.json / .md inside <out> when it is a folder).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # Llama-2-7B, and a tiny one to check the script on a CPU
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
               vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000),
}  # fmt: skip
GIB = 1024**3
TARGET_SECONDS = 300
TARGET_PEAK_GIB = 8.0


def build_random_llama(shape: dict, num_layers: int, device: torch.device, seed: int = 0):
    """fp16 LlamaForCausalLM in CPU memory, weights drawn on `device` (std 1/sqrt(fan_in); norms 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        **{**shape, "num_hidden_layers": num_layers},
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.to_empty(device="cpu")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # its buffers were left uninitialised
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            std = 1.0 if "embed" in name else p.shape[1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float16) * std)
    config.torch_dtype = "float16"
    return model, config


_STEP_PATTERNS = (  # progress message -> step name
    (re.compile(r"^embedding"), "embed calibration tokens"),
    (re.compile(r"capturing activations"), "layer forward + capture"),
    (re.compile(r"RTN reference error"), "RTN reference error"),
    (re.compile(r"scale search after (.+)"), "scale search"),
    (re.compile(r"clip search"), "clip search"),
    (re.compile(r"quantizing"), "quantize + pack + AWQ error"),
)


class StepRecorder:
    """A ProgressCallback that books time and peak GPU memory to the step each event closes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.steps = defaultdict(lambda: {"seconds": 0.0, "peak_bytes": 0, "count": 0})
        self.scale_groups = defaultdict(float)
        self.layer_seconds: list[float] = []
        self.current: str | None = None
        self.current_group: str | None = None
        self.t_last = time.perf_counter()
        self.t_layer = self.t_last

    def _close_current(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.current is not None:
            step = self.steps[self.current]
            step["seconds"] += now - self.t_last
            step["count"] += 1
            if self.cuda:
                step["peak_bytes"] = max(step["peak_bytes"], torch.cuda.max_memory_allocated(self.device))
            if self.current_group:
                self.scale_groups[self.current_group] += now - self.t_last
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t_last = now
        return now

    def on_progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        now = self._close_current()
        self.current, self.current_group = None, None
        if stage == "quantize":
            for pattern, name in _STEP_PATTERNS:
                m = pattern.search(message)
                if m:
                    self.current = name
                    self.current_group = m.group(1) if m.groups() else None
                    break
            if message.endswith(" done") or (message == "done" and done == total):
                self.layer_seconds.append(now - self.t_layer)
            if "capturing activations" in message:
                self.t_layer = now
        elif stage == "export" and done < total:
            self.current = f"export: {message}"
        print(f"[{now:10.1f}] {stage} {done}/{total} {message}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self._close_current()
        self.current = None


def run(args) -> dict:
    from quant.api import quantize_loaded
    from quant.arch import LLAMA_LIKE, LoadedModel, prepare_model
    from quant.awq import AWQConfig

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --shape tiny --device cpu for a smoke test")
    shape = SHAPES[args.shape]
    num_layers = args.num_layers or shape["num_hidden_layers"]

    t0 = time.perf_counter()
    model, config = build_random_llama(shape, num_layers, device)
    prepare_model(model)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    src = Path(tempfile.mkdtemp(prefix="bench-awq-src-"))
    export_dir = Path(args.export_dir) if args.export_dir else Path(tempfile.mkdtemp(prefix="bench-awq-out-")) / "out"
    try:
        config.to_json_file(str(src / "config.json"))
        loaded = LoadedModel(model, LLAMA_LIKE, src, json.loads((src / "config.json").read_text()), "hf", torch.float16)
        samples = torch.randint(
            0, shape["vocab_size"], (args.calib_samples, args.calib_seqlen), generator=torch.Generator().manual_seed(0)
        )
        cfg = AWQConfig(
            w_bits=4,
            w_group_size=args.w_group_size,
            search_scale=args.search_scale,
            clip=not args.no_clip,
            search_tokens=args.search_tokens,
            chunk_tokens=args.chunk_tokens,
        )
        recorder = StepRecorder(device)
        t0 = time.perf_counter()
        report = quantize_loaded(
            loaded, export_dir, cfg, samples=samples, device=device, progress=recorder, overwrite=True, t_start=t0
        )
        recorder.finish()
        quant_s = time.perf_counter() - t0
        output_bytes = report["sizes"]["output_weight_bytes"]
    finally:
        shutil.rmtree(src, ignore_errors=True)
        if not args.export_dir:
            shutil.rmtree(export_dir.parent, ignore_errors=True)

    steps = {
        name: {
            "seconds": round(s["seconds"], 3),
            "peak_gib": round(s["peak_bytes"] / GIB, 3) if recorder.cuda else None,
            "events": s["count"],
        }
        for name, s in recorder.steps.items()
    }
    peak_gib = max((s["peak_gib"] or 0.0) for s in steps.values()) if recorder.cuda else None
    result = {
        "model": {"shape": args.shape, **shape, "num_hidden_layers": num_layers, "dtype": "float16"},
        "settings": {
            "calib_samples": args.calib_samples,
            "calib_seqlen": args.calib_seqlen,
            "w_group_size": args.w_group_size,
            "search_scale": args.search_scale,
            "clip": not args.no_clip,
            "search_tokens": args.search_tokens,
            "chunk_tokens": args.chunk_tokens,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
        },
        "build_model_s": round(build_s, 2),
        "quantize_total_s": round(quant_s, 2),
        "peak_gpu_gib": peak_gib,
        "steps": steps,
        "scale_search_by_group_s": {k: round(v, 3) for k, v in recorder.scale_groups.items()},
        "per_layer_s": [round(s, 3) for s in recorder.layer_seconds],
        "output_weight_gib": round(output_bytes / GIB, 3),
        "mean_awq_over_rtn_layer_mse": report["error_summary"]["mean_awq_over_rtn_layer_mse"],
        "targets": {
            "seconds": TARGET_SECONDS,
            "peak_gib": TARGET_PEAK_GIB,
            "time_ok": quant_s < TARGET_SECONDS if num_layers == shape["num_hidden_layers"] else None,
            "memory_ok": peak_gib < TARGET_PEAK_GIB if peak_gib is not None else None,
        },
    }
    if num_layers != shape["num_hidden_layers"] and recorder.layer_seconds:
        per_layer = sum(recorder.layer_seconds) / len(recorder.layer_seconds)
        result["projected_full_depth_s"] = round(quant_s + per_layer * (shape["num_hidden_layers"] - num_layers), 1)
    return result


def to_markdown(r: dict) -> str:
    m, s = r["model"], r["settings"]
    lines = [
        f"# AWQ W4A16 quantizer: {'Llama-2-7B' if m['shape'] == '7b' else m['shape']} shape "
        f"({m['num_hidden_layers']} layers), random fp16 weights",
        "",
        f"{s['calib_samples']} x {s['calib_seqlen']} calibration tokens, group {s['w_group_size']}, "
        f"search_scale={s['search_scale']}, clip={s['clip']}, search tokens {s['search_tokens']}, "
        f"chunk {s['chunk_tokens']} tokens; {s['gpu'] or s['device']}, torch {s['torch']}",
        "",
        "| step | seconds | peak GPU GiB |",
        "|---|---:|---:|",
    ]
    for name, st in r["steps"].items():
        peak = f"{st['peak_gib']:.2f}" if st["peak_gib"] is not None else "-"
        lines.append(f"| {name} | {st['seconds']:.1f} | {peak} |")
    peak = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
    lines += [
        f"| **total (quantize + export)** | **{r['quantize_total_s']:.1f}** | **{peak}** |",
        "",
        f"Model build (not in the total): {r['build_model_s']:.1f} s. "
        f"Output weights: {r['output_weight_gib']:.2f} GiB.",
        f"Targets: < {r['targets']['seconds']} s (met: {r['targets']['time_ok']}), "
        f"peak < {r['targets']['peak_gib']} GiB (met: {r['targets']['memory_ok']}).",
    ]
    if "projected_full_depth_s" in r:
        lines.append(f"Projected at full depth: {r['projected_full_depth_s']:.0f} s.")
    if r["per_layer_s"]:
        per = r["per_layer_s"]
        lines.append(f"Per layer: mean {sum(per) / len(per):.2f} s, max {max(per):.2f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="report path prefix (writes .json and .md), or a folder")
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers for a quick check")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--w-group-size", type=int, default=128)
    p.add_argument("--search-scale", action="store_true", help="also search the weight-aware scale form")
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--search-tokens", type=int, default=65536)
    p.add_argument("--chunk-tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--export-dir", default=None, help="keep the quantized folder here (default: a temp dir, deleted)")
    args = p.parse_args(argv)

    result = run(args)
    out = Path(args.out)
    if out.is_dir():
        out = out / "bench_awq"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = to_markdown(result)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
