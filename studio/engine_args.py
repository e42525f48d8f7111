"""Engine command-line flags, shared by app.py, `python -m studio.chat` and the benchmarks.
Spellings follow LMDeploy where it has the flag (--quant-policy, --cache-max-entry-count, --session-len ...)."""

from __future__ import annotations

import argparse

from engine.config import VALID_DTYPES, VALID_MODEL_FORMATS, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model-format", choices=VALID_MODEL_FORMATS, default="auto",
                   help="weights format; auto reads quantization_config from config.json")
    g.add_argument("--dtype", choices=VALID_DTYPES, default="auto")
    g.add_argument("--quant-policy", type=int, choices=(0, 4, 8), default=0,
                   help="KV cache: 0 = model dtype, 8 = int8, 4 = int4")
    g.add_argument("--cache-max-entry-count", type=float, default=0.8,
                   help="fraction of the memory free after loading the weights that the KV cache takes")
    g.add_argument("--cache-block-seq-len", type=int, default=64, help="tokens per KV block")
    g.add_argument("--session-len", type=int, default=None, help="max prompt + reply tokens per request")
    g.add_argument("--max-batch-size", type=int, default=128)
    g.add_argument("--max-prefill-token-num", type=int, default=8192)
    g.add_argument("--tp", type=int, default=1, help="tensor parallel ranks (GPUs; gloo processes on CPU)")
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights from config.json alone (benchmarks)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run tokenizer code shipped in the model folder (InternLM2 needs it)")
    v = parser.add_argument_group("vision (LLaVA)")
    v.add_argument("--vision-tower", default=None, metavar="PATH",
                   help="the CLIP checkpoint (folder or hub id) of an original-layout LLaVA's vision tower, "
                        "instead of the mm_vision_tower its config.json names")
    v.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="chat messages may name image files (paths, file:// URLs) inside DIR; default: refused")
    v.add_argument("--allow-media-urls", action=argparse.BooleanOptionalAction, default=False,
                   help="fetch http(s) image URLs named in chat messages (the server makes the request); "
                        "default: refused, send images as data URLs")
    v.add_argument("--limit-images-per-prompt", type=int, default=4, metavar="N")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model_format=args.model_format,
        dtype=args.dtype,
        quant_policy=args.quant_policy,
        cache_max_entry_count=args.cache_max_entry_count,
        cache_block_seq_len=args.cache_block_seq_len,
        session_len=args.session_len,
        max_batch_size=args.max_batch_size,
        max_prefill_token_num=args.max_prefill_token_num,
        tp=args.tp,
        device=args.device,
        enable_prefix_caching=not args.no_prefix_caching,
        use_cuda_graph=not args.eager,
        trust_remote_code=args.trust_remote_code,
        load_format=args.load_format,
        vision_tower=args.vision_tower,
        allowed_local_media_path=args.allowed_local_media_path,
        allow_media_urls=args.allow_media_urls,
        limit_images_per_prompt=args.limit_images_per_prompt,
    )
