"""`python -m quant MODEL --work-dir OUT ...`: AWQ W4A16 quantization from the terminal (LMDeploy's flag names).

Exit codes: 0 done, 2 bad input (missing model, unknown dataset, bad group size ...), 130 cancelled (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from engine.config import VALID_DTYPES  # names only: engine.config imports no torch (fast --help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quant",
        description="Quantize a Hugging Face checkpoint to W4A16 with AWQ; writes an AutoAWQ-GEMM-format folder.",
    )
    p.add_argument(
        "model", help="local Hugging Face model folder (Llama, Mistral, Qwen2, InternLM2; LLaVA, Qwen2-VL, Qwen2.5-VL, "
        "InternVL: their language model)"
    )
    p.add_argument("--work-dir", required=True, help="output folder (written atomically at the end)")
    p.add_argument(
        "--calib-dataset",
        default="builtin",
        help="builtin (offline: text this machine already has, Python's docs and docstrings) | wikitext2 | ptb | c4 "
        "| pileval (Hugging Face hub) | a local .txt/.jsonl/.json/.csv/.parquet file or save_to_disk folder "
        "(default: %(default)s)",
    )
    p.add_argument("--calib-samples", type=int, default=128, help="calibration blocks (default: %(default)s)")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per block (default: %(default)s)")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits; the GEMM format holds 4 (default)")
    p.add_argument("--w-group-size", type=int, default=128, help="input channels per scale/zero (default: 128)")
    p.add_argument(
        "--search-scale",
        action="store_true",
        help="also search LMDeploy's weight-aware scale form x_mean^r / w_mean^(1-r) (doubles the scale search)",
    )
    p.add_argument("--no-clip", action="store_true", help="skip the clip (max-abs shrink) search")
    p.add_argument("--method", choices=("awq", "rtn"), default="awq", help="awq, or plain round to nearest")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (default: cuda when available)")
    p.add_argument("--dtype", choices=VALID_DTYPES, default="auto", help="compute dtype (default: auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the folder's own tokenizer code (InternLM2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --work-dir")
    p.add_argument("--search-tokens", type=int, default=65536, help="tokens the scale search uses (default: 65536)")
    p.add_argument("--chunk-tokens", type=int, default=8192, help="tokens per forward chunk (default: 8192)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def quiet_progress_bars() -> None:
    """--quiet: no bars at all, ours nor the libraries' (transformers' "Loading weights", the hub's downloads)."""
    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it for every new bar
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        quiet_progress_bars()
    # lazy: the quantizer pulls in torch and transformers (seconds); --help and argument errors answer before that
    from quant.api import quantize_model
    from quant.awq import NullProgress, TqdmProgress  # lazy: as above
    from quant.errors import CalibDataError, QuantizationCancelled  # lazy: as above

    progress = NullProgress() if args.quiet else TqdmProgress()
    try:
        report = quantize_model(
            args.model,
            args.work_dir,
            calib_dataset=args.calib_dataset,
            calib_samples=args.calib_samples,
            calib_seqlen=args.calib_seqlen,
            w_bits=args.w_bits,
            w_group_size=args.w_group_size,
            search_scale=args.search_scale,
            clip=not args.no_clip,
            method=args.method,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
            overwrite=args.overwrite,
            progress=progress,
            awq_options={"search_tokens": args.search_tokens, "chunk_tokens": args.chunk_tokens},
        )
    except (QuantizationCancelled, KeyboardInterrupt):
        print("\ncancelled: nothing was written to --work-dir", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, CalibDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if isinstance(progress, TqdmProgress):
            progress.close()
    sizes, summary = report["sizes"], report["error_summary"]
    print(f"wrote {report['work_dir']} in {report['timings_s']['total']:.1f} s")
    st = report["settings"]
    if st.get("calib_source"):
        asked = st.get("calib_samples_requested")
        short = f" (of {asked} asked for: the data ran out)" if asked and st["calib_samples"] < asked else ""
        print(f"calibration: {st['calib_source']}, {st['calib_samples']} samples{short} x {st['calib_seqlen']} tokens")
    print(f"weights: {sizes['source_weight_bytes'] / 2**20:.1f} MiB -> {sizes['output_weight_bytes'] / 2**20:.1f} MiB")
    if summary.get("mean_awq_over_rtn_layer_mse") is not None:
        print(f"layer output MSE, AWQ / RTN (mean over layers): {summary['mean_awq_over_rtn_layer_mse']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
