"""Checkpoint folder -> model with weights: local folders or hub ids, safetensors (sharded or not) or *.bin,
plain Hugging Face weights or AWQ (GEMM layout) ones.

Every way a folder can be wrong ends in a ModelLoadError that names the path and what was found there.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from engine.errors import ModelLoadError  # noqa: F401 - re-exported
from engine.layers.linear import load_shard
from engine.models import internlm2
from engine.models.llama import LlamaForCausalLM, plain_linear
from engine.models.spec import ModelSpec, UnsupportedModelError, parse_model_spec

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# what an error says instead of listing a folder's entries (which would show any folder's contents to a caller)
MODEL_FOLDER_NEEDS = "a model folder holds config.json, tokenizer files and *.safetensors or *.bin weights"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_hub_id(model: str) -> bool:
    return bool(_HUB_ID.match(model))


def resolve_model_path(model: str | Path) -> Path:
    """A local folder as is; a hub id ("org/name") downloaded through huggingface_hub when online."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file, not a model folder (expected a folder with config.json)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model folder: it has no config.json ({MODEL_FOLDER_NEEDS})")
        return path
    if not _HUB_ID.match(str(model)):
        raise ModelLoadError(f"model path {str(model)!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(model),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken", "*.jinja"],
        )
    except Exception as e:  # offline, unknown repo, gated ...
        raise ModelLoadError(
            f"{model!r} is not a local folder, and fetching it from the model hub failed ({type(e).__name__}: {e}). "
            "Pass the path of a downloaded checkpoint folder."
        ) from e
    return resolve_model_path(local)


def read_model_spec(path: Path) -> ModelSpec:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    gen_cfg_path = path / "generation_config.json"
    try:
        spec = parse_model_spec(cfg, str(path / "config.json"))
    except UnsupportedModelError:
        raise
    except KeyError as e:
        raise ModelLoadError(f"{path / 'config.json'} lacks {e.args[0]!r}: is this a causal LM checkpoint?") from e
    if gen_cfg_path.is_file():
        gen = json.loads(gen_cfg_path.read_text())
        eos = gen.get("eos_token_id")
        for t in eos if isinstance(eos, list) else [eos] if eos is not None else []:
            if int(t) not in spec.eos_token_ids:
                spec.eos_token_ids.append(int(t))
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
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    if model_format == "awq":
        return torch.float16
    return DTYPES.get(spec.torch_dtype, torch.float16) if spec.torch_dtype != "float32" else torch.float16


def check_weights_present(path: Path) -> None:
    if not any(path.glob("*.safetensors")) and not any(p.name != "training_args.bin" for p in path.glob("*.bin")):
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, safetensors preferred over *.bin; shards in index order."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        return
    bins = sorted(p for p in path.glob("*.bin") if p.name != "training_args.bin")
    if not bins:
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    for f in bins:
        for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
            yield name, t


def _checkpoint_tensors(path: Path, spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in iter_checkpoint(path):
        if name.startswith("language_model."):
            name = name[len("language_model.") :]
        if spec.family == "internlm2":
            yield from internlm2.convert_tensor(name, t, spec)
        else:
            yield name, t


def build_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, model_format: str) -> nn.Module:
    make_linear = plain_linear
    if model_format == "awq":
        from engine.layers.awq_linear import awq_linear_factory

        make_linear = awq_linear_factory(spec.quantization_config or {}, dtype)
    with torch.device(device):
        return LlamaForCausalLM(spec, dtype, make_linear)


def load_weights(model: nn.Module, path: Path, spec: ModelSpec) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    packed = getattr(model, "packed_modules_mapping", {})
    for name, tensor in _checkpoint_tensors(path, spec):
        if "rotary_emb" in name:
            continue
        target, shard_id = name, None
        for ckpt_part, (fused_part, sid) in packed.items():
            if f".{ckpt_part}." in name:
                target, shard_id = name.replace(f".{ckpt_part}.", f".{fused_part}."), sid
                break
        param = params.get(target)
        if param is None:
            if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision")):
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
