"""Tiny real-architecture Hugging Face checkpoints with random weights, written to a folder, for the tests.

Each `make_*` writes a complete folder (safetensors weights, config.json, generation_config.json and the local
byte-level BPE tokenizer from studio.demo_model) and returns its path. Weights are float32, seeded, and drawn
at unit activation scale (see studio.demo_model.init_random_weights_), so logits are well spread and a mix-up
of norms or biases shows. The model's vocab_size always equals len(tokenizer).

Llama, Mistral and Qwen2 come from transformers' own classes, so `AutoModelForCausalLM.from_pretrained(path)`
is the reference the engine is checked against. transformers has no InternLM2, so `make_internlm2` writes a
Llama's weights twice: once as a Llama (the reference) and once in InternLM2's checkpoint layout (packed wqkv,
its own names, its own config.json), which only the engine's loader reads.

config.json as transformers 5 writes it keeps RoPE settings in `rope_parameters` (theta inside) and the dtype in
`dtype`; we add `torch_dtype`. `legacy_config_keys=True` rewrites it the way transformers 4 / most hub folders
have it: top-level `rope_theta` and `rope_scaling`, `torch_dtype` only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from studio.demo_model import build_tokenizer, init_random_weights_, save_causal_lm, special_token_ids

# What internlm2_5-*-chat configs carry: dynamic NTK scaling, which only changes RoPE past max_position_embeddings.
INTERNLM2_ROPE_SCALING = {"type": "dynamic", "factor": 2.0}
INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
}
LLAMA_REFERENCE_DIRNAME = "llama-reference"
INTERNLM2_DIRNAME = "internlm2"


def write_tokenizer(path):
    """Save the local tokenizer into `path` (created if needed) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return build_tokenizer(path)


def make_llama(
    path,
    *,
    num_kv_heads: int | None = None,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 128,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 1024,
    rms_norm_eps: float = 1e-6,
    shards: int = 1,
    legacy_config_keys: bool = False,
    seed: int = 0,
) -> Path:
    """LlamaForCausalLM; num_kv_heads None means MHA. rope_scaling e.g. {"rope_type": "llama3", "factor": 8.0, ...}."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _make_hf_causal_lm(
        LlamaConfig,
        LlamaForCausalLM,
        path,
        num_kv_heads=num_kv_heads or heads,
        num_layers=num_layers,
        hidden=hidden,
        heads=heads,
        intermediate=intermediate,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        shards=shards,
        legacy_config_keys=legacy_config_keys,
        seed=seed,
    )


def make_mistral(
    path,
    *,
    num_kv_heads: int = 2,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 128,
    rope_theta: float = 1_000_000.0,
    sliding_window: int | None = None,  # None as Mistral-7B v0.2 / v0.3; v0.1 had 4096
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 1024,
    shards: int = 1,
    legacy_config_keys: bool = False,
    seed: int = 0,
) -> Path:
    """MistralForCausalLM with GQA."""
    from transformers import MistralConfig, MistralForCausalLM

    return _make_hf_causal_lm(
        MistralConfig,
        MistralForCausalLM,
        path,
        num_kv_heads=num_kv_heads,
        num_layers=num_layers,
        hidden=hidden,
        heads=heads,
        intermediate=intermediate,
        rope_theta=rope_theta,
        rope_scaling=None,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        shards=shards,
        legacy_config_keys=legacy_config_keys,
        seed=seed,
        sliding_window=sliding_window,
    )


def make_qwen2(
    path,
    *,
    num_kv_heads: int = 2,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 128,
    rope_theta: float = 1_000_000.0,
    tie_word_embeddings: bool = True,  # as Qwen2 0.5B / 1.5B: the folder has no lm_head.weight
    max_position_embeddings: int = 1024,
    shards: int = 1,
    legacy_config_keys: bool = False,
    seed: int = 0,
) -> Path:
    """Qwen2ForCausalLM: q/k/v projections with biases, drawn non-zero so that dropping them shows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _make_hf_causal_lm(
        Qwen2Config,
        Qwen2ForCausalLM,
        path,
        num_kv_heads=num_kv_heads,
        num_layers=num_layers,
        hidden=hidden,
        heads=heads,
        intermediate=intermediate,
        rope_theta=rope_theta,
        rope_scaling=None,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        shards=shards,
        legacy_config_keys=legacy_config_keys,
        seed=seed,
    )


def make_internlm2(
    path,
    *,
    num_kv_heads: int = 2,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 128,
    rope_theta: float = 1_000_000,
    rope_scaling: dict | None = INTERNLM2_ROPE_SCALING,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write `path/internlm2` (InternLM2 layout) and `path/llama-reference` (same weights as a Llama).

    Returns (internlm2_path, llama_reference_path). rope_scaling uses InternLM2's spelling ({"type": ...});
    the reference gets the transformers equivalent, so both describe the same model at every length.
    Weight names: model.tok_embeddings, model.layers.{i}.attention.wqkv / wo, feed_forward.w1 (gate) / w3 (up) /
    w2 (down), attention_norm, ffn_norm, model.norm, output. wqkv's rows are grouped per KV head g:
    [the num_heads // num_kv_heads q heads of group g, k head g, v head g], head_dim rows each, as
    modeling_internlm2.py's rearrange "b q (h gs d) -> b q h gs d" with gs = 2 + num_key_value_groups reads them.
    """
    if heads % num_kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    path = Path(path)
    internlm2_path, reference_path = path / INTERNLM2_DIRNAME, path / LLAMA_REFERENCE_DIRNAME
    reference_rope = None
    if rope_scaling is not None:
        reference_rope = {"rope_type": rope_scaling.get("rope_type", rope_scaling.get("type"))}
        reference_rope.update({k: v for k, v in rope_scaling.items() if k not in ("type", "rope_type")})
    make_llama(
        reference_path,
        num_kv_heads=num_kv_heads,
        num_layers=num_layers,
        hidden=hidden,
        heads=heads,
        intermediate=intermediate,
        rope_theta=float(rope_theta),
        rope_scaling=reference_rope,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        seed=seed,
    )

    from safetensors.torch import load_file, save_file

    llama = load_file(str(reference_path / "model.safetensors"))
    head_dim = hidden // heads
    tensors = {
        "model.tok_embeddings.weight": llama["model.embed_tokens.weight"],
        "model.norm.weight": llama["model.norm.weight"],
        "output.weight": llama["lm_head.weight"],
    }
    for i in range(num_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        tensors[dst + "attention.wqkv.weight"] = pack_wqkv(
            llama[src + "self_attn.q_proj.weight"],
            llama[src + "self_attn.k_proj.weight"],
            llama[src + "self_attn.v_proj.weight"],
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
        )
        tensors[dst + "attention.wo.weight"] = llama[src + "self_attn.o_proj.weight"]
        tensors[dst + "feed_forward.w1.weight"] = llama[src + "mlp.gate_proj.weight"]
        tensors[dst + "feed_forward.w3.weight"] = llama[src + "mlp.up_proj.weight"]
        tensors[dst + "feed_forward.w2.weight"] = llama[src + "mlp.down_proj.weight"]
        tensors[dst + "attention_norm.weight"] = llama[src + "input_layernorm.weight"]
        tensors[dst + "ffn_norm.weight"] = llama[src + "post_attention_layernorm.weight"]

    internlm2_path.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in sorted(tensors.items())}
    save_file(tensors, str(internlm2_path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = write_tokenizer(internlm2_path)
    ids = special_token_ids(tokenizer)
    config = {  # the fields and spellings of internlm2_5-7b-chat's config.json
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": dict(INTERNLM2_AUTO_MAP),
        "bias": False,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_position_embeddings,
        "model_type": "internlm2",
        "num_attention_heads": heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pad_token_id": ids["pad_token_id"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": dict(rope_scaling) if rope_scaling is not None else None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": len(tokenizer),
    }
    _write_json(internlm2_path / "config.json", config)
    generation_config = {
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": [ids["eos_token_id"], ids["im_end_token_id"]],  # chat turns end with <|im_end|>
        "pad_token_id": ids["pad_token_id"],
        "transformers_version": "4.41.0",
    }
    _write_json(internlm2_path / "generation_config.json", generation_config)
    return internlm2_path, reference_path


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Separate q [heads * head_dim, hidden], k / v [num_kv_heads * head_dim, hidden] -> InternLM2's grouped wqkv."""
    hidden = q.shape[1]
    q_per_kv = q.shape[0] // (num_kv_heads * head_dim)
    q = q.reshape(num_kv_heads, q_per_kv, head_dim, hidden)
    k = k.reshape(num_kv_heads, 1, head_dim, hidden)
    v = v.reshape(num_kv_heads, 1, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)  # [num_kv_heads * (q_per_kv + 2) * head_dim, hidden]


def _make_hf_causal_lm(
    config_class,
    model_class,
    path,
    *,
    num_kv_heads: int,
    num_layers: int,
    hidden: int,
    heads: int,
    intermediate: int,
    rope_theta: float,
    rope_scaling: dict | None,
    tie_word_embeddings: bool,
    max_position_embeddings: int,
    rms_norm_eps: float,
    shards: int,
    legacy_config_keys: bool,
    seed: int,
    **extra_config,
) -> Path:
    if hidden % heads or heads % num_kv_heads:
        raise ValueError(
            f"need hidden % heads == 0 and heads % num_kv_heads == 0, got {hidden}, {heads}, {num_kv_heads}"
        )
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = special_token_ids(tokenizer)
    rope_parameters = {"rope_type": "default"}
    if rope_scaling is not None:
        rope_parameters = {"rope_type": rope_scaling.get("rope_type", rope_scaling.get("type"))}
        rope_parameters.update({k: v for k, v in rope_scaling.items() if k not in ("type", "rope_type")})
    rope_parameters["rope_theta"] = rope_theta
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_parameters=rope_parameters,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        dtype="float32",
        **extra_config,
    )
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    init_random_weights_(model, seed=seed)
    max_shard_size = None
    if shards > 1:
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
        max_shard_size = math.ceil(total_bytes / shards)
    save_causal_lm(model, tokenizer, path, max_shard_size=max_shard_size)
    if legacy_config_keys:
        _rewrite_config_legacy(path / "config.json")
    return path


def _rewrite_config_legacy(config_path: Path) -> None:
    """transformers 5's rope_parameters / dtype -> the rope_theta / rope_scaling / torch_dtype that hub folders use."""
    config = json.loads(config_path.read_text())
    rope_parameters = dict(config.pop("rope_parameters", None) or {})
    config["rope_theta"] = rope_parameters.pop("rope_theta", 10000.0)
    config["rope_scaling"] = rope_parameters if rope_parameters.get("rope_type", "default") != "default" else None
    config["torch_dtype"] = config.pop("dtype", None) or config.get("torch_dtype", "float32")
    _write_json(config_path, config)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
