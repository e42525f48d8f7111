"""Collectives of the tensor-parallel group on torch.distributed (NCCL on GPUs, gloo on CPU).

Model code calls `all_reduce` / `all_gather_last` unconditionally: with no process group (tp = 1) they return
their input untouched, so the single-GPU path runs no extra op. The per-step broadcast packs a step's inputs
into two int64 tensors (a fixed-size header on a host-side gloo group, then one payload), never a pickled Python object.

Timeouts: the groups are made with the startup timeout (loading shards and sizing the KV cache can keep one rank
far behind another); `set_step_timeout` then bounds every collective of a step. The header group never times out,
since idle workers wait on it for as long as the engine has no work, so rank 0 bounds its own side of each header
broadcast: gloo only sends once the receiver has posted its receive, and a rank that hangs before posting it would
otherwise hold rank 0 forever (and with it every request).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from engine import envs
from engine.layers.attention import AttentionMetadata

# header: [kind, num_tokens, batch, max_blocks, max_seqlen_q, num_sample_rows, payload_len, unused]
HEADER_LEN = 8
KIND_PREFILL, KIND_DECODE, KIND_STOP = 1, 2, 3

_state = {"world_size": 1, "rank": 0, "device": torch.device("cpu"), "header_group": None, "step_timeout_s": None}


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_rank(rank: int, world_size: int, device: torch.device, init_method: str = "env://") -> None:
    # startup's collectives (rendezvous, KV sizing, facts) wait as long as a slow rank may take to load its shard
    # (ENGINE_TP_STARTUP_TIMEOUT_S); set_step_timeout then bounds the steps' collectives by ENGINE_TP_TIMEOUT_S
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=envs.tp_startup_timeout_s()),
                            device_id=device if device.type == "cuda" else None)
    header_group = dist.new_group(backend="gloo", timeout=timedelta(days=365))  # step headers (host tensors)
    set_group(rank, world_size, device, header_group)


def set_group(rank: int, world_size: int, device: torch.device, header_group=None) -> None:
    _state.update(rank=rank, world_size=world_size, device=device, header_group=header_group, step_timeout_s=None)


def set_step_timeout(seconds: float) -> None:
    """From now on a collective of the main group fails after `seconds` (startup ran under a longer timeout), and so
    does rank 0's wait for a step header or stop to be taken."""
    _set_pg_timeout(timedelta(seconds=seconds))
    _state["step_timeout_s"] = seconds


def _send_header(header: torch.Tensor, what: str) -> None:
    work = dist.broadcast(header, src=0, group=_state["header_group"], async_op=True)
    seconds = _state["step_timeout_s"]
    if seconds is None:
        work.wait()
        return
    try:
        work.wait(timeout=timedelta(seconds=seconds))
    except RuntimeError as e:
        raise RuntimeError(f"the {what} was not taken by every rank within {seconds:g} s ({e})") from e


def clear_group() -> None:
    _state.update(rank=0, world_size=1, header_group=None, step_timeout_s=None)


def world_size() -> int:
    return _state["world_size"]


def rank() -> int:
    return _state["rank"]


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (the row-parallel linear's partial outputs)."""
    if _state["world_size"] == 1:
        return x
    dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension (vocab-parallel logits)."""
    n = _state["world_size"]
    if n == 1:
        return x
    out = torch.empty((n, *x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous()) if x.is_cuda else dist.all_gather(list(out.unbind(0)), x)
    return torch.cat(out.unbind(0), dim=-1)


def min_across_ranks(value: int) -> int:
    if _state["world_size"] == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_state["device"])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's small list of ints (same length), as a list per rank (startup facts for pipe.memory())."""
    t = torch.tensor(values, dtype=torch.int64, device=_state["device"])
    if _state["world_size"] == 1:
        return [values]
    out = [torch.empty_like(t) for _ in range(_state["world_size"])]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def broadcast_step(input_ids, positions, meta, sample_rows: list[int]) -> None:
    """Rank 0: send one step's inputs (ids, positions, slots, kv_lens, block tables, cu_seqlens, sample rows)."""
    dev = input_ids.device
    parts = [input_ids, positions, meta.slot_mapping, meta.kv_lens.to(torch.int64),
             meta.block_tables.to(torch.int64).flatten()]
    if meta.is_prefill:
        parts.append(meta.cu_seqlens_q.to(torch.int64))
    parts.append(torch.tensor(sample_rows, dtype=torch.int64).to(dev))
    payload = torch.cat(parts)
    header = torch.tensor([KIND_PREFILL if meta.is_prefill else KIND_DECODE, input_ids.shape[0],
                           meta.block_tables.shape[0], meta.block_tables.shape[1], meta.max_seqlen_q,
                           len(sample_rows), payload.shape[0], 0], dtype=torch.int64)  # host: gloo group
    _send_header(header, "step header")
    dist.broadcast(payload, src=0)


def broadcast_stop() -> None:
    _send_header(torch.tensor([KIND_STOP] + [0] * (HEADER_LEN - 1), dtype=torch.int64), "stop")


def receive_step(device: torch.device):
    """Workers: the next step's inputs, or None for stop. Returns (input_ids, positions, meta, sample_rows)."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header, src=0, group=_state["header_group"])
    kind, n, b, mb, max_q, ns, plen, _ = header.tolist()
    if kind == KIND_STOP:
        return None
    payload = torch.empty(plen, dtype=torch.int64, device=device)
    dist.broadcast(payload, src=0)
    sizes = [n, n, n, b, b * mb] + ([b + 1] if kind == KIND_PREFILL else []) + [ns]
    chunks = payload.split(sizes)
    meta = AttentionMetadata(
        is_prefill=kind == KIND_PREFILL,
        slot_mapping=chunks[2],
        block_tables=chunks[4].view(b, mb).to(torch.int32),
        kv_lens=chunks[3].to(torch.int32),
        cu_seqlens_q=chunks[5].to(torch.int32) if kind == KIND_PREFILL else None,
        max_seqlen_q=max_q,
    )
    return chunks[0], chunks[1], meta, chunks[-1]
