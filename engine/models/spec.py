"""What the engine needs to know about a checkpoint, read from its config.json as plain JSON.

Reading the JSON ourselves (rather than through transformers' AutoConfig) lets folders whose model_type
transformers does not know, such as InternLM2's custom-code checkpoints, load without running their code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.errors import UnsupportedModelError  # noqa: F401 - re-exported


@dataclass
class ModelSpec:
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    quantization_config: dict | None = None
    sliding_window: int | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the whole config.json (vision part included)
    family: str = "llama"  # the registry entry's family: which module and weight names (engine/models/__init__.py)
    vision: object | None = field(default=None, repr=False)  # vision-language models: the entry's vision spec

    @property
    def num_params(self) -> int:
        """Parameter count of the unquantized model (embeddings and head included)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + self.vocab_size * h + head + h


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in (x if isinstance(x, list) else [x])]


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture (engine/models/__init__.py's MODELS): how to read its config, build its module
    and map its checkpoint's tensor names onto the module's."""

    family: str  # ModelSpec.family: "llama", "internlm2", ...
    parse_spec: Callable[[dict, str], ModelSpec]  # (language-model config, architecture) -> spec
    build: Callable[..., object]  # (spec, dtype, make_linear) -> nn.Module with load-time name mapping
    convert_tensor: Callable[[str, object, ModelSpec], Iterable[tuple[str, object]]]  # ckpt tensor -> model's
    ignored_prefixes: tuple[str, ...] = ("vision_tower.", "multi_modal_projector.", "model.vision")  # not loaded
    # vision-language entries: an object with complete_config(cfg) -> cfg (fills partial hub configs),
    # resolve(spec, path, vision_tower) -> vision spec (finds the tower), extra_tensors(spec) (a separate tower's
    # weights, in the module's names) and image_processor(spec) (images -> pixels and feature counts); see llava.py
    multimodal: object | None = None


def no_extra_tensors(spec: ModelSpec):
    """A vision-language entry whose tower's weights all sit in the checkpoint itself: nothing to stream apart."""
    return iter(())


def parse_decoder_spec(cfg: dict, arch: str, family: str = "llama") -> ModelSpec:
    """A Llama-style decoder's spec from its (text) config dict; `arch` is the registered architecture name.
    Missing required keys raise KeyError (the loader names the key)."""
    num_heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    # transformers >= 5 writes rope settings as rope_parameters; older checkpoints use rope_theta/rope_scaling
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if arch == "Qwen2ForCausalLM":
        attention_bias = True
    elif arch == "InternLM2ForCausalLM":
        attention_bias = bool(cfg.get("bias", False))
    else:
        attention_bias = bool(cfg.get("attention_bias", False))
    # Sliding-window attention is not implemented: within the window it equals full attention, so the
    # engine caps session_len at the window instead (Mistral v0.1: 4096).
    sliding_window = None
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", arch == "MistralForCausalLM"):
        sliding_window = int(cfg["sliding_window"])
    return ModelSpec(
        architecture=arch,
        model_type=cfg.get("model_type", ""),
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_list(cfg.get("eos_token_id")),
        quantization_config=cfg.get("quantization_config"),
        sliding_window=sliding_window,
        raw=cfg,
        family=family,
    )
