"""Checkpoint folder -> paged model with weights: the architecture's module from the registry (engine/models), its
linears plain or AWQ (GEMM layout), its weights read through engine/checkpoint.py (local folders or hub ids,
safetensors, sharded or not, or *.bin).

Every way a folder can be wrong ends in a ModelLoadError that names the path and what was found there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from engine import checkpoint
from engine.checkpoint import (  # noqa: F401  (re-exported: older imports read them from the loader)
    DTYPES,
    ModelLoadError,
    check_weights_present,
    iter_checkpoint,
    resolve_model_path,
)
from engine.layers.awq_linear import awq_linear_factory
from engine.layers.linear import load_shard
from engine.models import entry_for, parse_model_spec
from engine.models.llama import plain_linear
from engine.models.spec import ModelSpec, UnsupportedModelError

log = logging.getLogger(__name__)


def read_model_spec(path: Path, vision_tower: str | None = None) -> ModelSpec:
    """The checkpoint's spec; for a vision-language model also its vision half, its tower found (`vision_tower`:
    a separate CLIP checkpoint that replaces the one config.json names)."""
    cfg = checkpoint.read_config(path)
    try:
        spec = parse_model_spec(cfg, str(path / "config.json"))
    except UnsupportedModelError:
        raise
    except KeyError as e:
        raise ModelLoadError(f"{path / 'config.json'} lacks {e.args[0]!r}: is this a causal LM checkpoint?") from e
    for t in checkpoint.generation_eos_ids(path):
        if t not in spec.eos_token_ids:
            spec.eos_token_ids.append(t)
    multimodal = entry_for(spec.architecture).multimodal
    if multimodal is not None:
        spec.vision = multimodal.resolve(spec, path, vision_tower)
    return spec


def detect_model_format(spec: ModelSpec, requested: str) -> str:
    quant = spec.quantization_config or {}
    found = "awq" if quant.get("quant_method") == "awq" else "hf"
    if quant and found == "hf":
        raise UnsupportedModelError(f"quantization method {quant.get('quant_method')!r} is not supported (AWQ is)")
    if requested == "auto":
        return found
    if requested != found:
        raise ModelLoadError(f"model_format={requested!r} was asked for, but config.json describes a {found!r} model")
    return requested


def resolve_dtype(requested: str, spec: ModelSpec, device: torch.device, model_format: str) -> torch.dtype:
    return checkpoint.resolve_dtype(requested, spec.torch_dtype, device, model_format)


def _checkpoint_tensors(path: Path, spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    entry = entry_for(spec.architecture)
    convert = entry.convert_tensor
    for name, t in iter_checkpoint(path):
        if name.startswith("language_model."):
            name = name[len("language_model.") :]
        yield from convert(name, t, spec)
    if entry.multimodal is not None:  # e.g. a LLaVA's vision tower kept in a separate CLIP checkpoint
        yield from entry.multimodal.extra_tensors(spec)


def build_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, model_format: str) -> nn.Module:
    make_linear = plain_linear
    if model_format == "awq":
        make_linear = awq_linear_factory(spec.quantization_config or {}, dtype)
    with torch.device(device):
        return entry_for(spec.architecture).build(spec, dtype, make_linear)


def load_weights(model: nn.Module, path: Path, spec: ModelSpec, tensors=None) -> None:
    # TP hook: `tensors` = this rank's slices (engine/parallel/shard_loader.py); None: the whole checkpoint
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    packed = getattr(model, "packed_modules_mapping", {})
    ignored = entry_for(spec.architecture).ignored_prefixes
    for name, tensor in tensors if tensors is not None else _checkpoint_tensors(path, spec):
        if "rotary_emb" in name:
            continue
        target, shard_id = name, None
        for ckpt_part, (fused_part, sid) in packed.items():
            if f".{ckpt_part}." in name:
                target, shard_id = name.replace(f".{ckpt_part}.", f".{fused_part}."), sid
                break
        param = params.get(target)
        if param is None:
            if name.startswith(ignored):
                continue
            raise ModelLoadError(f"{path}: checkpoint tensor {name!r} has no place in the {spec.architecture} model")
        tensor = tensor.to(device=param.device, dtype=param.dtype if param.is_floating_point() else tensor.dtype)
        if shard_id is None:
            if param.shape != tensor.shape:
                raise ModelLoadError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
            loaded.add(target)
        else:
            module = modules[target.rsplit(".", 1)[0]]
            load_shard(param, tensor, module.shard_sizes, shard_id)
            loaded.add(f"{target}#{shard_id}")
    missing = []
    for pname in params:
        if spec.tie_word_embeddings and pname == "lm_head.weight":
            continue
        module = modules[pname.rsplit(".", 1)[0]]
        shards = getattr(module, "shard_sizes", None)
        if shards and len(shards) > 1:
            missing += [f"{pname} (shard {i})" for i in range(len(shards)) if f"{pname}#{i}" not in loaded]
        elif pname not in loaded:
            missing.append(pname)
    if "lm_head.weight" in missing and "model.embed_tokens.weight" in loaded:
        model.lm_head.weight = model.model.embed_tokens.weight  # some tied checkpoints omit the flag
        missing.remove("lm_head.weight")
    if missing:
        raise ModelLoadError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {', '.join(missing[:5])}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes and dtypes: speed does not depend on the values, only on the sizes."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dtype == torch.int32:  # AWQ qweight / qzeros: any nibbles
            p.copy_(torch.randint(-(2**31), 2**31 - 1, p.shape, generator=gen, device=p.device, dtype=torch.int32))
        elif name.endswith("scales"):
            p.uniform_(0.001, 0.01, generator=gen)
        elif p.dim() == 1:
            p.uniform_(0.8, 1.2, generator=gen)  # norms (and biases)
        else:
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)


def load_model(path: Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device, model_format: str,
               load_format: str = "auto") -> nn.Module:
    model = build_model(spec, dtype, device, model_format)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, path, spec)
    for module in model.modules():  # layers that repack their weights for the kernels (AWQLinear)
        if hasattr(module, "post_load"):
            module.post_load()
    model.eval()
    return model
