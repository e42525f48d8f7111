"""Memory planner: what a model takes in memory under given settings, from config.json alone (no weights read, no
model built), with the engine's own sizing rules.

    plan = plan_memory("/models/llama2-7b", PlanSettings(weights="w4a16", quant_policy=4, gpu_memory_gb=24))
    plan["weights_bytes"], plan["kv_capacity_tokens"], plan["max_sessions"], plan["fits"]

- weights: every parameter as engine/models/llama.py builds it: embeddings, norms and lm_head in the compute dtype
  (lm_head counted once when tied); with W4A16 each decoder linear is an AWQLinear (layers/awq_linear.py): qweight
  in * out / 8 int32, qzeros and scales per group (scales fp16 when the compute dtype is fp32), the bias in dtype;
  `modules_to_not_convert` linears stay 16-bit. Exact: a test compares with the loaded engine's weights_bytes.
- KV bytes per token: engine.model_runner.kv_bytes_per_token (values + scales/zeros), not a copy of it.
- KV blocks as ModelRunner._plan_num_blocks: (free memory after weights) * cache_max_entry_count // block bytes;
  on CPU the budget is EngineConfig.cpu_kv_cache_bytes. On a GPU, free = total - CUDA context - weights - rotary
  tables; the context size is an estimate (CUDA_CONTEXT_BYTES), the rest is arithmetic.
- workspace (activations of one prefill chunk of max_prefill_token_num tokens) and the CUDA graphs' pool (decode
  activations and logits of the largest captured batch): estimates of what the engine allocates, labelled so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.loader import detect_model_format, resolve_dtype
from engine.memory import gpu_snapshot
from engine.model_runner import kv_bytes_per_token
from engine.models import parse_model_spec
from engine.models.spec import ModelSpec

GIB = 1024**3
GPU_PRESETS_GB = (24, 48, 80, 141)
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + cuBLAS / Triton handles outside torch's allocator (estimate)
WEIGHT_FORMATS = ("16bit", "w4a16")


@dataclass
class PlanSettings:
    weights: str = "16bit"  # "16bit": the checkpoint's dtype (or `dtype`); "w4a16": AWQ 4-bit, group `group_size`
    dtype: str = "auto"  # EngineConfig.dtype
    group_size: int = 128  # W4A16 group size when config.json has no quantization_config
    quant_policy: int = 0
    cache_max_entry_count: float = 0.8
    cache_block_seq_len: int = 64
    session_len: int | None = None
    max_batch_size: int = 128
    max_prefill_token_num: int = 8192
    device: str = "cuda"  # "cuda": plan for a GPU of gpu_memory_gb; "cpu": the engine's CPU budget
    gpu_memory_gb: float | None = 80.0  # total GPU memory in GB (10^9 bytes, as GPUs are sold); None: local GPU
    use_cuda_graph: bool = True
    cpu_kv_cache_bytes: int = EngineConfig.cpu_kv_cache_bytes
    num_gpu_blocks: int | None = None
    modules_to_not_convert: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.gpu_memory_gb is not None and not 0 < self.gpu_memory_gb <= 10_000:
            raise ValueError(f"gpu_memory_gb must be a positive size in GB, got {self.gpu_memory_gb}")
        # the engine's own validation of the shared settings
        self.engine_config()

    def engine_config(self) -> EngineConfig:
        return EngineConfig(dtype=self.dtype, quant_policy=self.quant_policy,
                            cache_max_entry_count=self.cache_max_entry_count,
                            cache_block_seq_len=self.cache_block_seq_len, session_len=self.session_len,
                            max_batch_size=self.max_batch_size, max_prefill_token_num=self.max_prefill_token_num,
                            cpu_kv_cache_bytes=self.cpu_kv_cache_bytes, num_gpu_blocks=self.num_gpu_blocks)


def read_config(model_path: str | Path) -> dict:
    path = Path(model_path).expanduser()
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise ValueError(f"{path} has no config.json: the planner needs a model folder (or its config.json)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e


def linear_shapes(spec: ModelSpec) -> list[tuple[str, int, int, bool]]:
    """(checkpoint-style name, in_features, out_features, has_bias) of every decoder linear, as llama.py builds them."""
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    out = []
    for n in range(spec.num_layers):
        p = f"model.layers.{n}"
        out += [(f"{p}.self_attn.qkv_proj", h, q + 2 * kv, spec.attention_bias),
                (f"{p}.self_attn.o_proj", q, h, False),
                (f"{p}.mlp.gate_up_proj", h, 2 * i, False),
                (f"{p}.mlp.down_proj", i, h, False)]
    return out


def _not_converted(prefix: str, skip: list[str]) -> bool:
    # the same rule as awq_linear_factory: the fused modules' checkpoint names count too
    names = {prefix, prefix.replace("qkv_proj", "q_proj"), prefix.replace("gate_up_proj", "gate_proj")}
    return any(s and s in name for s in skip for name in names)


def weights_breakdown(spec: ModelSpec, dtype: torch.dtype, weights: str, group_size: int,
                      skip: list[str] | None = None) -> dict:
    """Bytes of the engine's parameters: {'embeddings', 'lm_head', 'norms', 'linear', 'total'}."""
    elem = dtype.itemsize
    scale_elem = (torch.float16 if dtype == torch.float32 else dtype).itemsize
    h = spec.hidden_size
    embed = spec.vocab_size * h * elem
    lm_head = 0 if spec.tie_word_embeddings else spec.vocab_size * h * elem
    norms = (2 * spec.num_layers + 1) * h * elem
    linear = 0
    for name, fin, fout, bias in linear_shapes(spec):
        b = fout * elem if bias else 0
        if weights == "w4a16" and not _not_converted(name, skip or []):
            groups = fin // group_size
            linear += fin * fout // 2 + groups * fout // 2 + groups * fout * scale_elem + b
        else:
            linear += fin * fout * elem + b
    return {"embeddings": embed, "lm_head": lm_head, "norms": norms, "linear": linear,
            "total": embed + lm_head + norms + linear}


def rotary_bytes(spec: ModelSpec) -> int:
    """The cos/sin tables (fp32 buffers, [max_position, head_dim / 2] each) the model keeps on the device."""
    return 2 * spec.max_position_embeddings * (spec.head_dim // 2) * 4


def workspace_bytes(spec: ModelSpec, dtype: torch.dtype, num_tokens: int, num_logit_rows: int) -> int:
    """Peak activations of one forward pass over num_tokens (estimate): the residual stream, the qkv and attention
    outputs, the gate_up output and its SiLU product, plus fp32 logits for the sampled rows."""
    elem = dtype.itemsize
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_token = (3 * h + (q + 2 * kv) + q + 2 * i + i) * elem + 2 * (spec.head_dim // 2) * 4
    return num_tokens * per_token + num_logit_rows * spec.vocab_size * (4 + elem)


def cuda_graph_bytes(spec: ModelSpec, dtype: torch.dtype, max_batch_size: int, max_blocks: int) -> int:
    """The decode graphs' shared pool (estimate): the largest batch's activations and logits, and the static
    input buffers (ids, positions, slots, kv lens, block tables)."""
    static = max_batch_size * (8 + 8 + 8 + 4 + 4 * max_blocks)
    return workspace_bytes(spec, dtype, max_batch_size, max_batch_size) + static


def local_gpu_bytes() -> tuple[int, int] | None:
    """(total, used now by any process) of GPU 0 from NVML, which creates no CUDA context in this process (a
    context would take memory from the processes being planned for); None without a GPU."""
    snap = gpu_snapshot()
    if snap["available"] and snap["gpus"]:
        return int(snap["gpus"][0]["total_bytes"]), int(snap["gpus"][0]["used_bytes"])
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(total), int(total - free)


def plan_memory(model_path_or_config: str | Path | dict, settings: PlanSettings | None = None) -> dict:
    """The whole plan as a dict of ints / floats / strings (JSON-ready); see the module docstring."""
    s = settings or PlanSettings()
    cfg = model_path_or_config if isinstance(model_path_or_config, dict) else read_config(model_path_or_config)
    cfg = dict(cfg)
    spec = parse_model_spec(cfg)
    qc = spec.quantization_config or {}
    is_awq_folder = qc.get("quant_method") == "awq"
    if s.weights == "w4a16":
        group = qc.get("group_size", qc.get("q_group_size", s.group_size)) if is_awq_folder else s.group_size
        skip = list(qc.get("modules_to_not_convert") or []) if is_awq_folder else list(s.modules_to_not_convert)
        bad = [f"{name} ({fin})" for name, fin, _, _ in linear_shapes(spec)[:4] if fin % group]
        if bad:
            raise ValueError(f"W4A16 group size {group} does not divide the input width of {', '.join(bad)}")
        model_format = "awq"
    else:
        if is_awq_folder:
            raise ValueError("this folder holds AWQ (W4A16) weights: plan it as 'w4a16', or pick the 16-bit folder")
        group, skip = None, []
        model_format = detect_model_format(spec, "hf")
    device = torch.device(s.device)
    dtype = resolve_dtype(s.dtype, spec, device, model_format)
    w = weights_breakdown(spec, dtype, s.weights, group or 1, skip)
    per_token = kv_bytes_per_token(spec, dtype, s.quant_policy)
    block = s.cache_block_seq_len
    block_bytes = per_token * block
    max_len = spec.max_position_embeddings
    if spec.sliding_window:
        max_len = min(max_len, spec.sliding_window)
    session_len = min(s.session_len or max_len, max_len)
    rotary = rotary_bytes(spec)
    if s.device == "cuda":
        used_by_others = 0
        if s.gpu_memory_gb is not None:
            total = int(s.gpu_memory_gb * 1e9)
        else:
            local = local_gpu_bytes()
            if local is None:
                raise ValueError("no local GPU: type a GPU memory size (e.g. 24, 48, 80 or 141 GB)")
            total, used_by_others = local  # e.g. the app's own loaded model: the KV fraction is of what is free
        context = CUDA_CONTEXT_BYTES
        free_after_weights = total - used_by_others - context - w["total"] - rotary
        budget = max(0, free_after_weights) * s.cache_max_entry_count
        graph_blocks = (min(s.session_len or spec.max_position_embeddings, spec.max_position_embeddings)
                        + block - 1) // block
        graphs = cuda_graph_bytes(spec, dtype, s.max_batch_size, graph_blocks) if s.use_cuda_graph else 0
    else:
        total, context, graphs, used_by_others = None, 0, 0, 0
        free_after_weights = None
        budget = s.cpu_kv_cache_bytes * s.cache_max_entry_count
    num_blocks = s.num_gpu_blocks if s.num_gpu_blocks is not None else int(budget // block_bytes)
    kv_bytes = num_blocks * block_bytes
    workspace = workspace_bytes(spec, dtype, min(s.max_prefill_token_num, max(session_len, block)),
                                min(s.max_batch_size, s.max_prefill_token_num))
    blocks_per_session = (session_len + block - 1) // block
    max_sessions = num_blocks // blocks_per_session if num_blocks else 0
    predicted_total = context + w["total"] + rotary + kv_bytes + workspace + graphs
    if s.device == "cuda":
        fits = num_blocks >= 1 and predicted_total + used_by_others <= total
        if num_blocks < 1:
            why = "the weights leave no room for a single KV block"
        elif not fits:
            why = (f"weights + KV cache + workspace + CUDA graphs need {predicted_total / GIB:.2f} GiB of "
                   f"{total / GIB:.2f} GiB")
        else:
            why = f"{predicted_total / GIB:.2f} of {total / GIB:.2f} GiB"
    else:
        fits = num_blocks >= 1
        why = "CPU: the KV budget is EngineConfig.cpu_kv_cache_bytes x cache_max_entry_count"
    return {
        "architecture": spec.architecture, "num_params": spec.num_params, "device": s.device,
        "dtype": str(dtype).replace("torch.", ""), "model_format": model_format, "weights": s.weights,
        "group_size": group, "quant_policy": s.quant_policy, "cache_max_entry_count": s.cache_max_entry_count,
        "session_len": session_len, "block_size": block,
        "weights_bytes": w["total"], "weights_breakdown": w, "rotary_bytes": rotary,
        "kv_bytes_per_token": per_token, "num_kv_blocks": num_blocks, "kv_cache_bytes": kv_bytes,
        "kv_capacity_tokens": num_blocks * block, "blocks_per_session": blocks_per_session,
        "max_sessions": max_sessions, "workspace_bytes_estimate": workspace, "cuda_graph_bytes_estimate": graphs,
        "cuda_context_bytes_estimate": context, "free_after_weights_bytes": free_after_weights,
        "gpu_total_bytes": total, "gpu_used_by_others_bytes": used_by_others,
        "predicted_total_bytes": predicted_total, "fits": bool(fits), "fits_note": why,
        "settings": asdict(s),
    }

