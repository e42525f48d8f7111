"""Memory accounting: NVML per-GPU readings, the torch allocator, and the engine's own breakdown
(weights, KV cache allocated / in use, activations and other)."""

from __future__ import annotations

import os

import torch

_nvml_state: dict = {}


def _nvml():
    """The pynvml module, initialised once; None without a driver or the package."""
    if "module" not in _nvml_state:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_state["module"] = pynvml
        except Exception as e:  # noqa: BLE001 - no GPU, no driver, no package: all mean "no NVML"
            _nvml_state["module"] = None
            _nvml_state["error"] = f"{type(e).__name__}: {e}"
    return _nvml_state["module"]


def gpu_snapshot() -> dict:
    """{'available': bool, 'gpus': [{index, name, used_bytes, total_bytes, process_bytes}], 'reason': str}."""
    nvml = _nvml()
    if nvml is None:
        return {"available": False, "gpus": [], "reason": f"NVML unavailable ({_nvml_state.get('error')})"}
    gpus = []
    pid = os.getpid()
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        info = nvml.nvmlDeviceGetMemoryInfo(h)
        name = nvml.nvmlDeviceGetName(h)
        process_bytes = 0
        try:
            for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid == pid and p.usedGpuMemory:
                    process_bytes += p.usedGpuMemory
        except Exception:  # noqa: BLE001 - not permitted in some containers
            process_bytes = None
        gpus.append({
            "index": i,
            "name": name.decode() if isinstance(name, bytes) else name,
            "used_bytes": int(info.used),
            "total_bytes": int(info.total),
            "process_bytes": process_bytes,
        })
    return {"available": True, "gpus": gpus, "reason": ""}


def cpu_snapshot() -> dict:
    """This process's resident memory and the machine's total/available, from /proc (Linux)."""
    out = {"process_rss_bytes": None, "total_bytes": None, "available_bytes": None}
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["process_rss_bytes"] = int(line.split()[1]) * 1024
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    out["total_bytes" if key == "MemTotal" else "available_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def engine_memory_report(engine) -> dict:
    runner, manager = engine.runner, engine.block_manager
    report = {
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "model_format": engine.model_format,
        "quant_policy": engine.config.quant_policy,
        "weights_bytes": runner.weights_bytes,
        "kv_cache_bytes": runner.kv_cache_bytes,
        "kv_bytes_per_token": runner.kv_bytes_per_token,
        "block_size": engine.block_size,
        "num_kv_blocks": manager.num_blocks,
        "free_kv_blocks": manager.num_free_blocks,
        "used_kv_blocks": manager.num_used_blocks,
        "kv_capacity_tokens": engine.capacity_tokens,
        "kv_usage": manager.num_used_blocks / manager.num_blocks,
        "vision_bytes": getattr(runner, "vision_bytes", 0),  # vision tower + projector (not in weights_bytes)
        "cuda_graph_bytes": getattr(runner, "cuda_graph_bytes", 0),
        "tp": engine.config.tp,
    }
    cache = getattr(runner, "encoder_cache", None)
    if cache is not None:  # projected image features kept for later turns (engine/encoder_cache.py)
        report.update({"encoder_cache_bytes": cache.num_bytes, "encoder_cache_capacity_bytes": cache.max_bytes,
                       "encoder_cache_entries": len(cache), "encoder_cache_hits": cache.num_hits,
                       "encoder_cache_misses": cache.num_misses,
                       # held apart before the KV cache was sized (GPU): the encoder cache's and the prepared
                       # images' budgets, and the tower's activations at the most tiles a step encodes (measured)
                       "vision_reserved_bytes": runner.vision_reserved_bytes,
                       "vision_activation_bytes": runner.vision_activation_bytes,
                       "max_vision_tiles_per_step": runner.max_vision_tiles})
    if getattr(runner, "tp_ranks", None):  # TP hook: every rank's weights / KV cache (static, from startup)
        report["ranks"] = runner.tp_ranks
        report["weights_bytes_all_ranks"] = sum(r["weights_bytes"] for r in runner.tp_ranks)
    if engine.device.type == "cuda":
        allocated = torch.cuda.memory_allocated(engine.device)
        report.update({
            "torch_allocated_bytes": allocated,
            "torch_reserved_bytes": torch.cuda.memory_reserved(engine.device),
            "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(engine.device),
            "activations_other_bytes": max(0, allocated - runner.weights_bytes - runner.kv_cache_bytes
                                          - report["vision_bytes"]),
        })
        report.update(memory_parts(report, gpu_snapshot()))
    return report


def memory_parts(report: dict, gpu: dict | None = None) -> dict:
    """The Compare tab's breakdown of this process's device memory: weights, KV cache, CUDA graphs (their pool),
    activations / workspace (the rest of torch's reserved memory) and other (CUDA context, handles: what NVML sees
    beyond torch's reserve). Parts a reading lacks are None."""
    reserved = report.get("torch_reserved_bytes")
    fixed = report["weights_bytes"] + report["kv_cache_bytes"] + report.get("vision_bytes", 0)
    graphs = report.get("cuda_graph_bytes", 0)
    process = None
    if gpu and gpu.get("available"):
        index = torch.device(report["device"]).index or 0
        match = [g for g in gpu["gpus"] if g["index"] == index]
        process = match[0]["process_bytes"] if match else None
    return {
        "part_weights_bytes": report["weights_bytes"] + report.get("vision_bytes", 0),
        "part_kv_cache_bytes": report["kv_cache_bytes"],
        "part_cuda_graph_bytes": graphs,
        "part_activations_bytes": max(0, reserved - fixed - graphs) if reserved is not None else None,
        "part_other_bytes": max(0, process - reserved) if process and reserved is not None else None,
        "nvml_process_bytes": process,
    }
