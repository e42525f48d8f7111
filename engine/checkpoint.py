"""The one place that reads checkpoint folders: a local path or hub id -> folder, config.json and
generation_config.json as plain JSON, the weight files and their tensors, and the compute dtype.

The engine's loader and the quantizer (quant/) both read checkpoints through this module. Every way a folder can be
wrong ends in a ModelLoadError that names the path and what a model folder needs (never the folder's entries).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.errors import ModelLoadError  # noqa: F401 - re-exported: older imports read it from here

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken", "*.jinja"]  # what a hub
# download fetches: config, weights, tokenizer and custom code (no *.bin: folders with safetensors need none)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# what an error says instead of listing a folder's entries (which would show any folder's contents to a caller)
MODEL_FOLDER_NEEDS = "a model folder holds config.json, tokenizer files and *.safetensors or *.bin weights"


def is_hub_id(model: str | Path) -> bool:
    return bool(_HUB_ID.match(str(model)))


def resolve_model_path(model: str | Path, offline_reason: Callable[[], str | None] | None = None) -> Path:
    """A local folder as is (checked to hold a config.json); a hub id ("org/name") downloaded through huggingface_hub.

    `offline_reason`, when given, is asked before downloading: a reason string fails fast instead of waiting on the
    network (the quantizer passes its hub probe)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file, not a model folder (expected a folder with config.json)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model folder: it has no config.json ({MODEL_FOLDER_NEEDS})")
        return path
    if not is_hub_id(model):
        raise ModelLoadError(f"model path {str(model)!r} does not exist")
    reason = offline_reason() if offline_reason is not None else None
    if reason is not None:
        raise ModelLoadError(
            f"model path {str(model)!r} does not exist locally, and the hub cannot be reached to download it "
            f"({reason}); pass the path of a downloaded checkpoint folder"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(model), allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated ...
        raise ModelLoadError(
            f"model path {str(model)!r} does not exist locally, and fetching it from the model hub failed "
            f"({type(e).__name__}: {e}); pass the path of a downloaded checkpoint folder"
        ) from e
    return resolve_model_path(local)


def read_config(path: Path) -> dict:
    """config.json of a resolved folder, as a dict."""
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from e


def text_config(cfg: dict) -> dict:
    """The language model's part of a config: vision-language folders (LLaVA) nest it under text_config."""
    return cfg.get("text_config") or cfg


def generation_eos_ids(path: Path) -> list[int]:
    """eos ids listed by generation_config.json (one or several; none when the file is absent)."""
    gen_cfg_path = path / "generation_config.json"
    if not gen_cfg_path.is_file():
        return []
    eos = json.loads(gen_cfg_path.read_text()).get("eos_token_id")
    return [int(t) for t in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files, safetensors preferred over *.bin (some folders hold both); shards in name order."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    return sorted(p for p in path.glob("*.bin") if p.name != "training_args.bin")


def check_weights_present(path: Path) -> None:
    if not checkpoint_files(path):
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the folder, on the CPU, in the checkpoint's own names and dtypes."""
    files = checkpoint_files(path)
    if not files:
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        else:
            yield from torch.load(f, map_location="cpu", weights_only=True).items()


def resolve_dtype(requested: str, checkpoint_dtype: str | None, device: torch.device,
                  model_format: str = "hf") -> torch.dtype:
    """auto: fp32 on CPU (CPU half matmuls crawl); on GPU fp16 for AWQ, else the checkpoint's half dtype (bf16 stays
    bf16, fp32 and unknown become fp16)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {requested!r}")
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    if model_format == "awq":
        return torch.float16
    return torch.bfloat16 if checkpoint_dtype == "bfloat16" else torch.float16


def checkpoint_dtype(cfg: dict) -> str | None:
    """The dtype config.json names (transformers >= 5 writes `dtype`, older ones `torch_dtype`)."""
    tc = text_config(cfg)
    return tc.get("torch_dtype") or tc.get("dtype") or cfg.get("torch_dtype") or cfg.get("dtype")
