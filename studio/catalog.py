"""The model library: every model folder under the folders the server was given (--model-dir), the quantized output
root, the default and demo models and the Hugging Face cache, described from what is on disk (config.json and file
sizes; nothing is loaded): architecture, parameters, size on disk, format (fp16 / AWQ W4 group 128 / converted from
GGUF), whether it sees images, and the last Compare result for it. A folder that looks like a model but cannot be
one (config.json unreadable, an unsupported architecture, no weights, GGUF only) is listed with the reason, so one
bad folder never breaks the list."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.models import UnsupportedModelError, parse_model_spec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_FILE_SUFFIXES = WEIGHT_SUFFIXES + (".gguf",)
CONVERTED_MARKER = ".conversion-complete"  # written by the default model's GGUF conversion when it is whole
MAX_DEPTH = 3  # root/org/name/snapshot: deep enough for the usual layouts, shallow enough to stay quick
MAX_FOLDERS = 5000  # folders looked at per root, so a huge tree cannot stall the page


@dataclass
class CatalogEntry:
    path: str
    name: str
    where: str  # which root it was found under ("model dir", "quantized here", "Hugging Face cache" ...)
    architecture: str = ""
    params: int | None = None
    size_bytes: int = 0
    format: str = ""
    vision: bool = False
    compare: str = ""  # the last Compare result, in a few words
    problem: str = ""  # why this folder cannot be loaded; empty for a good one

    @property
    def ok(self) -> bool:
        return not self.problem


def folder_bytes(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:
            continue
    return total


def weight_format(cfg: dict, folder: Path) -> str:
    """'AWQ W4, group 128', 'GGUF-converted (bf16)' or the checkpoint dtype ('float16', 'bfloat16' ...)."""
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() == "awq":
        bits = qc.get("bits", qc.get("w_bit", 4))
        group = qc.get("group_size", qc.get("q_group_size", "?"))
        return f"AWQ W{bits}, group {group}"
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("torch_dtype")
                or "fp16?")
    if (folder / CONVERTED_MARKER).exists():
        return f"GGUF-converted ({dtype})"
    return dtype


def describe_folder(folder: Path, where: str = "") -> CatalogEntry:
    """One folder as a library entry; never raises: what is wrong goes in `problem`."""
    entry = CatalogEntry(path=str(folder), name=folder.name, where=where)
    try:
        files = [f for f in folder.iterdir() if f.is_file()]
    except OSError as e:
        entry.problem = f"cannot be read ({e.strerror or e})"
        return entry
    entry.size_bytes = folder_bytes(folder)
    weights = [f for f in files if f.suffix in WEIGHT_SUFFIXES]
    config_path = folder / "config.json"
    if not config_path.exists():
        ggufs = [f for f in files if f.suffix == ".gguf"]
        entry.problem = ("GGUF file only: convert it to a Hugging Face folder first" if ggufs
                         else "no config.json (weights without a model description)")
        return entry
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("it is not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        entry.problem = f"config.json is not valid JSON ({e})"
        return entry
    archs = cfg.get("architectures") or []
    entry.architecture = ", ".join(archs) or str(cfg.get("model_type") or "?")
    entry.vision = "vision_config" in cfg or any("Llava" in a or "VL" in a for a in archs)
    entry.format = weight_format(cfg, folder)
    try:
        spec = parse_model_spec(cfg, f"{folder.name}/config.json")
        entry.params = spec.num_params
    except UnsupportedModelError as e:
        entry.problem = str(e).split(": ", 1)[-1]
        return entry
    except (KeyError, TypeError, ValueError) as e:
        entry.problem = f"config.json lacks what the engine needs ({type(e).__name__}: {e})"
        return entry
    if not weights:
        entry.problem = "no weight files (*.safetensors or *.bin)"
    return entry


def _looks_like_model(folder: Path) -> bool:
    try:
        return (folder / "config.json").exists() or any(
            f.suffix in MODEL_FILE_SUFFIXES for f in folder.iterdir() if f.is_file())
    except OSError:
        return False


def find_model_folders(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Folders under `root` (itself included) that hold a config.json or model files, not looking inside a model
    folder once found, nor in hidden folders (a quantization being written is one)."""
    found, queue, seen = [], [(Path(root), 0)], 0
    while queue and seen < MAX_FOLDERS:
        folder, depth = queue.pop(0)
        seen += 1
        if _looks_like_model(folder):
            found.append(folder)
            continue
        if depth >= max_depth:
            continue
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        queue.extend((c, depth + 1) for c in children)
    return found


def hf_cache_root() -> Path:
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser() / "hub"


def hf_cache_folders(hub: Path) -> list[tuple[Path, str]]:
    """(snapshot folder, 'org/name') of each model in a Hugging Face cache: its newest snapshot."""
    out = []
    for repo in sorted(hub.glob("models--*")) if hub.is_dir() else []:
        snapshots = [s for s in (repo / "snapshots").glob("*") if s.is_dir()]
        if snapshots:
            newest = max(snapshots, key=lambda s: s.stat().st_mtime)
            out.append((newest, repo.name[len("models--"):].replace("--", "/")))
    return out


def scan(roots: list[tuple[str | Path, str]], compare_results: dict[str, str] | None = None,
         hf_cache: Path | None = None) -> list[CatalogEntry]:
    """Every model folder under `roots` ((folder, where) pairs; a missing one is skipped) and in `hf_cache`, good
    ones first (by name), then the bad ones with their reasons. `compare_results`: resolved path -> a few words."""
    compare_results = compare_results or {}
    entries: dict[str, CatalogEntry] = {}
    for root, where in roots:
        root = Path(root).expanduser()
        if not root.is_dir():
            continue
        for folder in find_model_folders(root):
            key = str(folder.resolve())
            if key not in entries:
                entries[key] = describe_folder(folder, where)
    if hf_cache is not None:
        for folder, repo_id in hf_cache_folders(hf_cache):
            key = str(folder.resolve())
            if key not in entries:
                entry = describe_folder(folder, "Hugging Face cache")
                entry.name = repo_id
                entries[key] = entry
    for key, entry in entries.items():
        entry.compare = compare_results.get(key, "")
    return sorted(entries.values(), key=lambda e: (not e.ok, e.name.lower()))
