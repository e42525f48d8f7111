"""The model registry: architecture name (config.json `architectures`) -> spec parser, module builder and
checkpoint-name mapping (a `ModelEntry`, engine/models/spec.py). The loader builds and loads every model through it.

Adding an architecture is one new file plus one line in MODELS: write `engine/models/<name>.py` with
`ENTRY = ModelEntry(family, parse_spec, build, convert_tensor)` (see llama.py, internlm2.py), where
- `parse_spec(text_cfg, architecture) -> ModelSpec` reads the language model's config (for vision-language
  folders the `text_config` part, merged over the top-level keys; the whole config.json stays in `spec.raw`),
- `build(spec, dtype, make_linear) -> nn.Module` makes the module (linears from `make_linear`, so AWQ drops in),
- `convert_tensor(name, tensor, spec) -> [(name, tensor), ...]` maps one checkpoint tensor to the module's names,
then register it:  `"LlavaForConditionalGeneration": llava.ENTRY,`
"""

from __future__ import annotations

from engine.models import internlm2, internvl, llama, llava, qwen2_vl
from engine.models.spec import ModelEntry, ModelSpec, UnsupportedModelError

MODELS: dict[str, ModelEntry] = {
    "LlamaForCausalLM": llama.ENTRY,
    "MistralForCausalLM": llama.ENTRY,
    "Qwen2ForCausalLM": llama.ENTRY,
    "InternLM2ForCausalLM": internlm2.ENTRY,
    "LlavaForConditionalGeneration": llava.ENTRY,
    "LlavaNextForConditionalGeneration": llava.ENTRY,
    "LlavaLlamaForCausalLM": llava.ENTRY,
    "LlavaMistralForCausalLM": llava.ENTRY,
    "Qwen2VLForConditionalGeneration": qwen2_vl.ENTRY,
    "Qwen2_5_VLForConditionalGeneration": qwen2_vl.ENTRY,
    "InternVLForConditionalGeneration": internvl.ENTRY,
    "InternVLChatModel": internvl.ENTRY,
}


def supported_architectures() -> str:
    return ", ".join(MODELS)


def entry_for(architecture: str) -> ModelEntry:
    try:
        return MODELS[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {supported_architectures()}"
        ) from None


def language_model_config(cfg: dict) -> dict:
    """A vision-language config's text part over its top-level keys (quantization_config, dtype, token ids ...);
    a plain causal-LM config as it is."""
    text = cfg.get("text_config")
    if not text:
        return cfg
    top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    return {**top, **text}


def parse_model_spec(cfg: dict, source: str = "config.json") -> ModelSpec:
    """Build a ModelSpec from a config.json dict; unsupported architectures get an error naming what was found."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in MODELS), None)
    if arch is None:
        if "text_config" in cfg and "hidden_size" not in cfg:
            raise UnsupportedModelError(
                f"{source}: architecture {archs} (a vision-language model) is not supported yet; "
                f"supported: {supported_architectures()}"
            )
        raise UnsupportedModelError(
            f"{source}: architecture {archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {supported_architectures()}"
        )
    entry = MODELS[arch]
    if entry.multimodal is not None:
        cfg = entry.multimodal.complete_config(cfg)
    spec = entry.parse_spec(language_model_config(cfg), arch)
    spec.raw = cfg
    return spec


__all__ = ["MODELS", "ModelEntry", "ModelSpec", "UnsupportedModelError", "entry_for", "parse_model_spec",
           "supported_architectures"]
