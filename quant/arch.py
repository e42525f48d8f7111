"""Which models the quantizer knows, as a small table, and how it loads them.

A decoder layer is described by its scale groups: the linears that share one input, the module that produces that
input (a norm, or a linear whose output rows the AWQ scale can be folded into), and the module whose output is the
search's loss target. Llama, Mistral and Qwen2 (q/k/v biases) share one description since `transformers` gives
them the same module names; InternLM2 (`model_type: internlm2`, custom code that `transformers` lacks) is converted
to the Llama layout in memory at load and written back in its own names with the packed `wqkv` rebuilt per KV head
[q of the group..., k, v]. The layer list is found under any of a few paths, so the language model of a LLaVA
checkpoint fits the same walk.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.models.internlm2 import INTERNLM2_TO_LLAMA

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelPathError(ValueError):
    """The model folder is missing or is not a Hugging Face model folder."""


class UnsupportedArchitectureError(ValueError):
    pass


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


# ----------------------------------------------------------------------------- folders and configs


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken", "*.jinja"]


def resolve_model_dir(model: str | Path) -> Path:
    """A local folder as is; "org/name" downloaded from the hub when it is reachable (fails fast offline)."""
    path = Path(model).expanduser()
    if path.exists() or not _HUB_ID.match(str(model)):
        return path
    from quant.calib_data import hub_offline_reason

    reason = hub_offline_reason()
    if reason is not None:
        raise ModelPathError(
            f"model path {str(model)!r} does not exist locally, and the hub cannot be reached to download it "
            f"({reason}); pass the path of a downloaded checkpoint folder"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise ModelPathError(
            f"model path {str(model)!r} does not exist locally, and downloading it from the hub failed "
            f"({type(e).__name__}: {e}); pass the path of a downloaded checkpoint folder"
        ) from e


def read_config(model_path: str | Path) -> tuple[Path, dict]:
    path = resolve_model_dir(model_path)
    if not path.exists():
        raise ModelPathError(f"model path {str(model_path)!r} does not exist (expected a Hugging Face model folder)")
    if not path.is_dir():
        raise ModelPathError(f"model path {str(path)!r} is a file; expected a folder with config.json and weights")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelPathError(f"{path} is not a model folder: it has no config.json (a model folder holds "
                             "config.json, tokenizer files and *.safetensors or *.bin weights)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelPathError(f"{cfg_file} is not valid JSON: {e}") from e
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ModelPathError(f"{path} is already quantized ({method}); quantize the original fp16/bf16 checkpoint")
    return path, cfg


def text_config(cfg: dict) -> dict:
    """The language model's config: LLaVA-style folders nest it under text_config."""
    return cfg.get("text_config") or cfg


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


def checkpoint_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    return sorted(p for p in path.glob("*.bin") if p.name != "training_args.bin")


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(path)
    if not files:
        raise ModelPathError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        else:
            yield from torch.load(f, map_location="cpu", weights_only=True).items()


def resolve_dtype(requested: str, cfg: dict, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's half dtype on GPU (fp32 checkpoints -> fp16), fp32 on CPU (CPU half matmuls crawl)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {requested!r}")
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    tc = text_config(cfg)
    name = tc.get("torch_dtype") or tc.get("dtype") or cfg.get("torch_dtype") or cfg.get("dtype")
    return torch.bfloat16 if name == "bfloat16" else torch.float16


# ----------------------------------------------------------------------------- InternLM2 <-> Llama layout

_INTERNLM2_TO_LLAMA = (("output.", "lm_head."), *INTERNLM2_TO_LLAMA)  # the engine's renames + the lm_head


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


def split_wqkv(t: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's packed wqkv (dim 0 = output channels, per KV head [q x groups, k, v]) -> q, k, v."""
    groups = num_heads // num_kv_heads
    rest = t.shape[1:]
    head_dim = t.shape[0] // (num_kv_heads * (groups + 2))
    g = t.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = g[:, :groups].reshape(num_heads * head_dim, *rest)
    k = g[:, groups].reshape(num_kv_heads * head_dim, *rest)
    v = g[:, groups + 1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


def merge_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Inverse of split_wqkv; works for any tensor whose dim 0 is output channels (weights, ints, scales, biases)."""
    groups = num_heads // num_kv_heads
    rest = q.shape[1:]
    head_dim = q.shape[0] // num_heads
    qg = q.reshape(num_kv_heads, groups, head_dim, *rest)
    kg = k.reshape(num_kv_heads, 1, head_dim, *rest)
    vg = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((num_heads + 2 * num_kv_heads) * head_dim, *rest)


def internlm2_to_llama_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], cfg: dict
) -> Iterator[tuple[str, torch.Tensor]]:
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    for name, t in tensors:
        if ".attention.wqkv." in name:
            prefix, suffix = name.split(".attention.wqkv.")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(t, heads, kv_heads), strict=True):
                yield f"{prefix}.self_attn.{proj}.{suffix}", part.contiguous()
            continue
        yield _rename(name, _INTERNLM2_TO_LLAMA), t


def _rename(name: str, table: tuple[tuple[str, str], ...]) -> str:
    """First matching rule wins: a rule starting with '.' matches anywhere, others only at the start."""
    for old, new in table:
        if (old.startswith(".") and old in name) or name.startswith(old):
            return name.replace(old, new, 1)
    return name


def llama_to_internlm2_name(name: str) -> str:
    """Llama-layout module or tensor name (not q/k/v, which merge into wqkv) -> InternLM2 checkpoint name."""
    return _rename(name + ".", tuple((new, old) for old, new in _INTERNLM2_TO_LLAMA))[:-1]


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
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


def load_model(model_path: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu") -> LoadedModel:
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
    return LoadedModel(prepare_model(model), arch, path, cfg, source_format, torch_dtype)


def _load_internlm2(path: Path, cfg: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaForCausalLM

    lcfg = internlm2_llama_config(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(lcfg)
    state = {n: t.to(dtype) for n, t in internlm2_to_llama_tensors(iter_checkpoint(path), cfg)}
    if lcfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (lcfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelPathError(
            f"{path}: InternLM2 checkpoint does not match its config (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]})"
        )
    if lcfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers (rotary inv_freq) were created on meta: rebuild the rotary module on CPU
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config=lcfg)
    return model
