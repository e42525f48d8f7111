"""Which models the quantizer knows, as a small table: their scale groups and where their layers are.

A decoder layer is described by its scale groups: the linears that share one input, the module that produces that
input (a norm, or a linear whose output rows the AWQ scale can be folded into), and the module whose output is the
search's loss target. Llama, Mistral and Qwen2 (q/k/v biases) share one description since `transformers` gives
them the same module names; InternLM2 (`model_type: internlm2`, custom code that `transformers` lacks) is converted
to the Llama layout in memory at load and written back in its own names with the packed `wqkv` rebuilt per KV head
[q of the group..., k, v] (quant/source_model.py loads them). The layer list is found under any of a few paths, so
the language model of a LLaVA checkpoint fits the same walk.

Checkpoint reading lives in engine/checkpoint.py; the old names of this module (load_model, LoadedModel, read_config,
iter_checkpoint, split_wqkv, ...) still resolve, to their new homes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from engine.checkpoint import text_config
from quant.errors import ModelPathError, UnsupportedArchitectureError  # noqa: F401 - re-exported


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # module (in the layer) whose output is the linears' input; the AWQ scale is folded into it
    linears: tuple[str, ...]  # linears sharing that input, all scaled by one vector
    inspect: str | None = None  # module whose output the scale search compares; None: the single linear itself
    takes_attention_inputs: bool = False  # inspect module needs position embeddings / mask (self-attention)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    layer_paths: tuple[str, ...]  # candidate paths of the decoder-layer ModuleList; the first found wins
    groups: tuple[ScaleGroup, ...]
    no_clip: tuple[str, ...] = ()  # linears the clip search skips (q/k: clipping before q.k^T is unreliable)
    embed: str = "embed_tokens"  # attribute names on the layers' parent module
    rotary: str = "rotary_emb"

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)


LLAMA_LIKE = ArchSpec(
    name="llama",
    layer_paths=("model.layers", "model.language_model.layers", "language_model.model.layers"),
    groups=(
        ScaleGroup(
            "input_layernorm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            inspect="self_attn",
            takes_attention_inputs=True,
        ),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),  # only when v_proj's out == o_proj's in (MHA)
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

ARCHS: dict[str, ArchSpec] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "internlm2": LLAMA_LIKE,  # after conversion to the Llama layout
}


def arch_for_model_type(model_type: str) -> ArchSpec:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by the quantizer (supported: {', '.join(sorted(ARCHS))})"
        ) from None


def find_layers(model: nn.Module, arch: ArchSpec) -> tuple[str, nn.ModuleList]:
    for path in arch.layer_paths:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} has no decoder-layer list at any of {', '.join(arch.layer_paths)}"
    )


def linear_widths(cfg: dict) -> dict[str, int]:
    """Input widths of the quantized linears, from config.json alone (checked before any weight is read)."""
    tc = text_config(cfg)
    hidden = tc["hidden_size"]
    heads = tc["num_attention_heads"]
    head_dim = tc.get("head_dim") or hidden // heads
    return {
        "q/k/v_proj, gate/up_proj (hidden_size)": hidden,
        "o_proj (num_attention_heads x head_dim)": heads * head_dim,
        "down_proj (intermediate_size)": tc["intermediate_size"],
    }


_MOVED = {  # old name in this module -> (its module now, its name there)
    "LoadedModel": ("quant.source_model", "SourceModel"),
    "load_model": ("quant.source_model", "load_source_model"),
    "prepare_model": ("quant.source_model", "prepare_model"),
    "read_config": ("quant.source_model", "read_config"),
    "resolve_dtype": ("quant.source_model", "resolve_dtype"),
    "internlm2_llama_config": ("quant.source_model", "internlm2_llama_config"),
    "internlm2_to_llama_tensors": ("quant.source_model", "internlm2_to_llama_tensors"),
    "checkpoint_files": ("engine.checkpoint", "checkpoint_files"),
    "iter_checkpoint": ("engine.checkpoint", "iter_checkpoint"),
    "resolve_model_dir": ("engine.checkpoint", "resolve_model_path"),
    "HUB_PATTERNS": ("engine.checkpoint", "HUB_PATTERNS"),
    "DTYPES": ("engine.checkpoint", "DTYPES"),
    "split_wqkv": ("engine.models.internlm2", "split_wqkv"),
    "merge_wqkv": ("engine.models.internlm2", "merge_wqkv"),
    "llama_to_internlm2_name": ("engine.models.internlm2", "llama_to_internlm2_name"),
}


def __getattr__(name: str):
    if name in _MOVED:  # resolved on use: quant.source_model imports this module
        module, attr = _MOVED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
