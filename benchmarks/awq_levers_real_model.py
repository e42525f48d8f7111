"""AWQ levers on the real model, judged on every built-in held-out text: for each quantizer variant (round to
nearest, AWQ as shipped, without the clip search, with LMDeploy's weight-aware scale form in the grid, with the next
layer calibrated on the quantized layer's outputs, with a finer scale grid),
perplexity, KL divergence against the 16-bit model (mean / p99) and top-1 agreement per text (studio/quality.py,
the engine's one scoring path), and the share of round-to-nearest's perplexity increase each variant removes.

    python benchmarks/awq_levers_real_model.py --out /tmp/awq-levers                        # CPU: 8 x 256 calibration
    python benchmarks/awq_levers_real_model.py --calib-samples 128 --calib-seqlen 512 --out results/awq_levers  # GPU

Quantized folders are kept in --out (a rerun reuses them). Writes levers.json and levers.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # name: quantize_model keyword arguments on top of method / group / calibration
    "rtn": {"method": "rtn"},
    "awq": {"method": "awq"},
    "awq-noclip": {"method": "awq", "clip": False},
    "awq-weight-aware": {"method": "awq", "search_scale": True},
    "awq-qinputs": {"method": "awq", "awq_options": {"quantized_inputs": True}},
    "awq-qinputs-noclip": {"method": "awq", "clip": False, "awq_options": {"quantized_inputs": True}},
    "awq-grid40": {"method": "awq", "awq_options": {"n_grid": 40}},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="16-bit folder (default: SmolLM2-135M-Instruct in the cache)")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from engine import EngineConfig, pipeline
    from quant import quantize_model
    from studio.default_model import convert_from_wheel
    from studio.quality import QUICK_CHECK_TOKENS, quality_figures, score_texts

    model = Path(args.model) if args.model else Path(convert_from_wheel())
    config = EngineConfig(dtype="float32", session_len=QUICK_CHECK_TOKENS + 1, cache_block_seq_len=64,
                          num_gpu_blocks=QUICK_CHECK_TOKENS // 64 + 2, max_batch_size=1, use_cuda_graph=False)
    with pipeline(str(model), config) as pipe:
        reference = score_texts(pipe)
    results = {"16-bit": {"figures": quality_figures(reference, reference), "seconds": 0.0}}
    for name in args.variants.split(","):
        out = args.out / name
        t0 = time.perf_counter()
        if not (out / "config.json").is_file():
            quantize_model(model, out, w_group_size=args.group, calib_samples=args.calib_samples,
                           calib_seqlen=args.calib_seqlen, overwrite=True, **VARIANTS[name])
        seconds = time.perf_counter() - t0
        with pipeline(str(out), config) as pipe:
            results[name] = {"figures": quality_figures(score_texts(pipe), reference), "seconds": seconds}
        print(f"{name}: {results[name]['figures'].get('all')} ({seconds:.0f} s)", flush=True)
    lines = [f"# AWQ levers: {model.name}, group {args.group}, calibration {args.calib_samples} x "
             f"{args.calib_seqlen} (built-in set), first {QUICK_CHECK_TOKENS} tokens of each held-out text", "",
             "| variant | text | ppl | removed of RTN's increase | KLD mean | KLD p99 | top-1 |",
             "|---|---|---|---|---|---|---|"]
    base = results["16-bit"]["figures"]
    rtn = results.get("rtn", {}).get("figures")
    for name, r in results.items():
        for text, f in r["figures"].items():
            if text == "all":
                continue
            removed = ""
            if rtn and name not in ("16-bit", "rtn") and rtn[text]["ppl"] > base[text]["ppl"]:
                removed = f"{100 * (1 - (f['ppl'] - base[text]['ppl']) / (rtn[text]['ppl'] - base[text]['ppl'])):.0f}%"
            lines.append(f"| {name} | {text} | {f['ppl']:.3f} | {removed} | {f['kld_mean']:.4f} | "
                         f"{f['kld_p99']:.4f} | {100 * f['top1']:.1f}% |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "levers.json").write_text(json.dumps(results, indent=2))
    (args.out / "levers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
