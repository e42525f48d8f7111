"""The checkpoint the quantizer reads, as a `transformers` model in the Llama-like layout the layer walk expects.

Folders, configs, tensors and dtypes are read through the engine's checkpoint reader (engine/checkpoint.py);
InternLM2 (`model_type: internlm2`, custom code that `transformers` lacks) is converted to the Llama layout in
memory with the engine's own InternLM2 name mapping (engine/models/internlm2.py), and written back in its own names
by the exporter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine import checkpoint
from engine.checkpoint import ModelLoadError, text_config
from engine.models.internlm2 import to_llama_tensors
from quant.arch import ArchSpec, arch_for_model_type


def _hub_offline_reason() -> str | None:
    from quant.calib_data import hub_offline_reason

    return hub_offline_reason()


def read_config(model_path: str | Path) -> tuple[Path, dict]:
    """(folder, config.json) of an unquantized checkpoint: a local folder or a hub id (fails fast offline)."""
    path = checkpoint.resolve_model_path(model_path, offline_reason=_hub_offline_reason)
    cfg = checkpoint.read_config(path)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(f"{path} is already quantized ({method}); quantize the original fp16/bf16 checkpoint")
    return path, cfg


def resolve_dtype(requested: str, cfg: dict, device: torch.device) -> torch.dtype:
    """auto: fp16 on GPU, the dtype the engine runs W4A16 in (a bf16 search picked worse scales: SmolLM2-135M
    held-out perplexity 29.79 with a bf16 search vs 29.15 fp16 / 29.10 fp32, H200, BENCHMARKS.md); fp32 on CPU (CPU
    half matmuls crawl)."""
    return checkpoint.resolve_dtype(requested, checkpoint.checkpoint_dtype(cfg), device, model_format="awq")


def internlm2_llama_config(cfg: dict):
    from transformers import LlamaConfig

    heads = cfg["num_attention_heads"]
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling and "type" in rope_scaling and "rope_type" not in rope_scaling:
        rope_scaling = {"rope_type": rope_scaling["type"], **rope_scaling}
    return LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads", heads),
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", 10000.0),
        rope_scaling=rope_scaling,
        attention_bias=cfg.get("bias", True),  # InternLM2's `bias` covers wqkv and wo, as Llama's attention_bias
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id"),
    )


def internlm2_to_llama_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], cfg: dict
) -> Iterator[tuple[str, torch.Tensor]]:
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    for name, t in tensors:
        yield from to_llama_tensors(name, t, heads, kv_heads)


@dataclass
class SourceModel:
    model: nn.Module  # a transformers model in the Llama-like layout, on CPU, eval mode
    arch: ArchSpec
    path: Path
    config: dict  # config.json as read
    source_format: str  # "hf" (transformers names) or "internlm2" (written back in InternLM2 names)
    dtype: torch.dtype

    @property
    def text_config(self) -> dict:
        return text_config(self.config)


def _use_sdpa(model: nn.Module) -> None:
    """The layer walk passes no attention mask and relies on SDPA's is_causal path."""
    try:
        model.set_attn_implementation("sdpa")
    except Exception:  # older transformers
        model.config._attn_implementation = "sdpa"
    for cfg in (getattr(model.config, "text_config", None),):
        if cfg is not None:
            cfg._attn_implementation = "sdpa"


def prepare_model(model: nn.Module) -> nn.Module:
    """Make an in-memory transformers model ready for the layer walk (eval mode, SDPA, no grads)."""
    model.eval()
    model.requires_grad_(False)
    _use_sdpa(model)
    return model


def load_source_model(model_path: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu") -> SourceModel:
    """Load a checkpoint onto the CPU in the Llama-like layout the walk expects."""
    path, cfg = read_config(model_path)
    model_type = text_config(cfg).get("model_type") or cfg.get("model_type", "")
    arch = arch_for_model_type(model_type)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, cfg, torch.device(device))
    if model_type == "internlm2":
        model = _load_internlm2(path, cfg, torch_dtype)
        source_format = "internlm2"
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch_dtype, attn_implementation="sdpa")
        source_format = "hf"
    return SourceModel(prepare_model(model), arch, path, cfg, source_format, torch_dtype)


def _load_internlm2(path: Path, cfg: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaForCausalLM

    lcfg = internlm2_llama_config(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(lcfg)
    state = {n: t.to(dtype) for n, t in internlm2_to_llama_tensors(checkpoint.iter_checkpoint(path), cfg)}
    if lcfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (lcfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: InternLM2 checkpoint does not match its config (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]})"
        )
    if lcfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers (rotary inv_freq) were created on meta: rebuild the rotary module on CPU
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config=lcfg)
    return model
