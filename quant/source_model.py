"""The checkpoint the quantizer reads, as a `transformers` model in the Llama-like layout the layer walk expects.

Folders, configs, tensors and dtypes are read through the engine's checkpoint reader (engine/checkpoint.py);
InternLM2 (`model_type: internlm2`, custom code that `transformers` lacks) is converted to the Llama layout in
memory with the engine's own InternLM2 name mapping (engine/models/internlm2.py), and written back in its own names
by the exporter.

LLaVA folders (llava-hf `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` in any of
transformers' weight spellings, and the original liuhaotian `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM`
layout): only the language model is quantized, calibrated on text as LMDeploy does. Its tensors become the
`transformers` causal LM of the text backbone (Llama / Mistral / Qwen2); every other tensor (vision tower,
projector, NeXT's image_newline) is kept aside as it is and written back unchanged (16-bit) by the exporter, and
the language model's tensors go back under the checkpoint's own names.

InternVL folders: the -hf layout (`InternVLForConditionalGeneration`) goes the LLaVA way (its language model under
`language_model.*` / `model.language_model.*`; vision_tower and multi_modal_projector kept); the original
`InternVLChatModel` layout keeps `vision_model.*` and `mlp1.*` as they are and quantizes `language_model.*` (config in
`llm_config`; an InternLM2 decoder goes through the InternLM2 mapping and is written back in its own names).

Qwen2-VL / Qwen2.5-VL folders (hub `model.*` / `visual.*`, or transformers 5's `model.language_model.*` /
`model.visual.*`; config.json flat or with a nested text_config) go the same way: the decoder becomes transformers'
Qwen2ForCausalLM (on text, M-RoPE's three streams hold the same position, so it is the plain rope), the vision
tower and merger (`visual`) are kept as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine import checkpoint
from engine.checkpoint import ModelLoadError, text_config
from engine.models import language_model_config
from engine.models.internlm2 import to_llama_tensors
from engine.models.internvl import HF_ARCH, ORIGINAL_ARCH
from engine.models.internvl import complete_config as complete_internvl
from engine.models.llava import HF_ARCHS, ORIGINAL_ARCHS, TEXT_ARCHS, complete_config
from engine.models.qwen2_vl import ARCHS as QWEN_VL_ARCHS
from engine.models.qwen2_vl import complete_config as complete_qwen_vl
from quant.arch import ArchSpec, UnsupportedArchitectureError, arch_for_model_type
from quant.calib_data import hub_offline_reason


def _hub_offline_reason() -> str | None:
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
    source_format: str  # "hf" (transformers names), "internlm2" (written back in InternLM2 names), "llava"
    dtype: torch.dtype
    # LLaVA: the causal-LM name of a language-model tensor -> its name in the written folder
    export_name: Callable[[str], str] | None = None
    # LLaVA: the tensors that are not the language model's (vision tower, projector, image_newline), as read
    kept_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # LLaVA: module roots the folder keeps unquantized (named in quantization_config.modules_to_not_convert)
    keep_modules: tuple[str, ...] = ()

    @property
    def text_config(self) -> dict:
        return quant_text_config(self.config)


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
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, cfg, torch.device(device))
    if llava_layout(cfg) is not None:
        return _load_llava(path, cfg, torch_dtype)
    if qwen_vl_layout(cfg):
        return _load_qwen_vl(path, cfg, torch_dtype)
    if internvl_layout(cfg) == "hf":
        return _load_llava(path, cfg, torch_dtype, layout="hf", source_format="internvl")
    if internvl_layout(cfg) == "original":
        return _load_internvl_original(path, cfg, torch_dtype)
    model_type = text_config(cfg).get("model_type") or cfg.get("model_type", "")
    arch = arch_for_model_type(model_type)
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


def causal_lm_from_tensors(make_model: Callable, tcfg, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                           path: Path, what: str) -> nn.Module:
    """A transformers causal LM built on the meta device from `tcfg` (make_model(tcfg)), its weights assigned from
    `tensors` (transformers' names) in `dtype`; tied embeddings tied; the rotary module rebuilt on the CPU (its
    buffers were made on meta). ModelLoadError naming `what` when the tensors do not match the config."""
    tied = bool(getattr(tcfg, "tie_word_embeddings", False))
    with torch.device("meta"):
        model = make_model(tcfg)
    state = {n: t.to(dtype) for n, t in tensors.items() if "rotary_emb" not in n}
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: {what} does not match its config (missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]})")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=tcfg)
    return model


def _load_internlm2(path: Path, cfg: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaForCausalLM

    lcfg = internlm2_llama_config(cfg)
    tensors = dict(internlm2_to_llama_tensors(checkpoint.iter_checkpoint(path), cfg))
    return causal_lm_from_tensors(LlamaForCausalLM, lcfg, tensors, dtype, path, "the InternLM2 checkpoint")


# ---- LLaVA: the language model only -----------------------------------------------------------------------------
def llava_layout(cfg: dict) -> str | None:
    """"hf" (llava-hf LLaVA-1.5 / NeXT), "original" (liuhaotian LlavaLlamaForCausalLM ...) or None (not LLaVA)."""
    archs = cfg.get("architectures") or []
    if any(a in HF_ARCHS for a in archs):
        return "hf"
    if any(a in ORIGINAL_ARCHS for a in archs):
        return "original"
    return None


def quant_text_config(cfg: dict) -> dict:
    """The language model's config of any checkpoint the quantizer reads: llava-hf text_config filled with
    transformers' defaults (hub config.json files are partial), the original layout's own (Llama) keys, else the
    config itself."""
    if llava_layout(cfg) == "hf":
        return text_config(complete_config(cfg))
    if qwen_vl_layout(cfg):
        return language_model_config(complete_qwen_vl(cfg))
    if internvl_layout(cfg) == "hf":
        return text_config(complete_internvl(cfg))
    if internvl_layout(cfg) == "original":
        return dict(cfg["llm_config"])
    return text_config(cfg)


def _llava_text_config(cfg: dict, layout: str):
    """The transformers config of a LLaVA's text backbone."""
    import transformers

    if layout == "hf":
        text = dict(quant_text_config(cfg))
        model_type = text.get("model_type", "llama")
        if model_type not in TEXT_ARCHS:
            raise UnsupportedArchitectureError(
                f"a LLaVA with a {model_type!r} language model is not supported by the quantizer "
                f"(supported: {', '.join(TEXT_ARCHS)})"
            )
        for key in ("tie_word_embeddings",):  # llava-hf keeps it at the top level
            if key in cfg and key not in (cfg.get("text_config") or {}):
                text[key] = cfg[key]
    else:
        arch = next(a for a in cfg.get("architectures") or [] if a in ORIGINAL_ARCHS)
        model_type = "mistral" if ORIGINAL_ARCHS[arch] == "MistralForCausalLM" else "llama"
        text = dict(cfg)
    skip = ("model_type", "architectures", "auto_map", "quantization_config", "text_config", "vision_config",
            "transformers_version", "_name_or_path")
    text = {k: v for k, v in text.items() if k not in skip}
    return transformers.AutoConfig.for_model(model_type, **text), model_type


def _llava_split(cfg: dict, layout: str, tensors: Iterator[tuple[str, torch.Tensor]]):
    """Checkpoint tensors -> (causal-LM state dict, kept tensors, export_name). The language model's names are
    written back in the spelling the checkpoint used."""
    lm: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    spelling = None  # "v4": language_model.model.* / language_model.lm_head; "v5": model.language_model.* / lm_head
    for name, t in tensors:
        if layout == "original":
            if name.startswith(("model.mm_projector.", "model.vision_tower.", "model.image_newline")):
                kept[name] = t
            else:
                lm[name] = t
            continue
        if name.startswith("language_model."):
            lm[name[len("language_model."):]] = t
            spelling = spelling or "v4"
        elif name.startswith("model.language_model."):
            lm["model." + name[len("model.language_model."):]] = t
            spelling = spelling or "v5"
        elif name == "lm_head.weight":
            lm[name] = t
        else:
            kept[name] = t
    if layout == "original":
        return lm, kept, lambda n: n
    if spelling == "v5":
        return lm, kept, lambda n: "model.language_model." + n[len("model."):] if n.startswith("model.") else n
    return lm, kept, lambda n: "language_model." + n


def _llava_keep_modules(kept: dict[str, torch.Tensor], layout: str) -> tuple[str, ...]:
    roots = set()
    for name in kept:
        for root in ("vision_tower", "multi_modal_projector", "mm_projector"):
            if root in name.split("."):
                roots.add(root)
    roots.update(("vision_tower", "mm_projector") if layout == "original" else ("vision_tower",
                                                                                   "multi_modal_projector"))
    return tuple(sorted(roots))


def _load_llava(path: Path, cfg: dict, dtype: torch.dtype, layout: str | None = None,
                source_format: str = "llava") -> SourceModel:
    from transformers import AutoModelForCausalLM

    layout = layout or llava_layout(cfg)
    tcfg, model_type = _llava_text_config(cfg, layout)
    arch = arch_for_model_type(model_type)
    lm, kept, export_name = _llava_split(cfg, layout, checkpoint.iter_checkpoint(path))
    model = causal_lm_from_tensors(AutoModelForCausalLM.from_config, tcfg, lm, dtype, path,
                                   "the LLaVA language model's tensors")
    return SourceModel(prepare_model(model), arch, path, cfg, source_format, dtype, export_name=export_name,
                       kept_tensors=kept, keep_modules=_llava_keep_modules(kept, layout))


# ---- Qwen2-VL / Qwen2.5-VL ----------------------------------------------------------------------------------------
def qwen_vl_layout(cfg: dict) -> bool:
    return any(a in QWEN_VL_ARCHS for a in cfg.get("architectures") or [])


def _qwen_vl_text_config(cfg: dict):
    """transformers' Qwen2Config of a Qwen2(.5)-VL's decoder: its text keys, the rope theta, no M-RoPE section."""
    import transformers

    text = dict(quant_text_config(cfg))
    theta = text.get("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta", 1e6))
    skip = ("model_type", "architectures", "auto_map", "quantization_config", "text_config", "vision_config",
            "transformers_version", "_name_or_path", "rope_scaling", "rope_parameters", "rope_theta", "layer_types",
            "dtype", "torch_dtype")
    text = {k: v for k, v in text.items() if k not in skip}
    return transformers.AutoConfig.for_model("qwen2", rope_parameters={"rope_type": "default", "rope_theta": theta},
                                             **text)


def _qwen_vl_split(tensors: Iterator[tuple[str, torch.Tensor]]):
    """Checkpoint tensors -> (causal-LM state dict, kept tensors (the tower and merger), export_name)."""
    lm: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    nested = False  # transformers 5: model.language_model.* / model.visual.*; hub: model.* / visual.*
    for name, t in tensors:
        if name.startswith("model.language_model."):
            lm["model." + name[len("model.language_model."):]] = t
            nested = True
        elif name.startswith(("visual.", "model.visual.")):
            kept[name] = t
        else:
            lm[name] = t
    if nested:
        return lm, kept, lambda n: "model.language_model." + n[len("model."):] if n.startswith("model.") else n
    return lm, kept, lambda n: n


def _load_qwen_vl(path: Path, cfg: dict, dtype: torch.dtype) -> SourceModel:
    from transformers import Qwen2ForCausalLM

    tcfg = _qwen_vl_text_config(cfg)
    lm, kept, export_name = _qwen_vl_split(checkpoint.iter_checkpoint(path))
    model = causal_lm_from_tensors(Qwen2ForCausalLM, tcfg, lm, dtype, path, "the Qwen-VL language model's tensors")
    return SourceModel(prepare_model(model), arch_for_model_type("qwen2"), path, cfg, "qwen2_vl", dtype,
                       export_name=export_name, kept_tensors=kept, keep_modules=("visual",))


# ---- InternVL --------------------------------------------------------------------------------------------------------
def internvl_layout(cfg: dict) -> str | None:
    """"hf" (InternVLForConditionalGeneration), "original" (remote-code InternVLChatModel) or None."""
    archs = cfg.get("architectures") or []
    if HF_ARCH in archs:
        return "hf"
    if ORIGINAL_ARCH in archs:
        return "original"
    return None


def _load_internvl_original(path: Path, cfg: dict, dtype: torch.dtype) -> SourceModel:
    """language_model.* -> the causal LM (InternLM2 through its Llama mapping); vision_model.* / mlp1.* kept."""
    import transformers

    text = dict(cfg["llm_config"])
    lm: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    for name, t in checkpoint.iter_checkpoint(path):
        if name.startswith("language_model."):
            lm[name[len("language_model."):]] = t
        else:
            kept[name] = t
    if "InternLM2ForCausalLM" in (text.get("architectures") or []) or text.get("model_type") == "internlm2":
        model_type, source_format = "internlm2", "internlm2"
        tcfg = internlm2_llama_config(text)
        lm = dict(internlm2_to_llama_tensors(iter(lm.items()), text))
        model_class = transformers.LlamaForCausalLM
    else:
        model_type, source_format = text.get("model_type", "qwen2"), "internvl"
        skip = ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version",
                "_name_or_path", "attn_implementation")
        tcfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in text.items() if k not in skip})
        model_class = transformers.AutoModelForCausalLM.from_config
    arch = arch_for_model_type(model_type)
    model = causal_lm_from_tensors(model_class, tcfg, lm, dtype, path, "the InternVL language model's tensors")
    return SourceModel(prepare_model(model), arch, path, cfg, source_format, dtype,
                       export_name=lambda n: "language_model." + n, kept_tensors=kept,
                       keep_modules=("mlp1", "vision_model"))
