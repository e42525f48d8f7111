"""Sharded loading for tensor parallelism: each rank builds the model at its local sizes and reads only its
slice of each tensor (safetensors `get_slice`), so no rank materialises the whole model.

Split plan (Megatron style): q/k/v and gate/up are column-parallel (output features split), o_proj and down_proj
row-parallel (input features split, partial sums all-reduced by the model), embed_tokens / lm_head split along
the vocabulary (padded to a multiple of tp). Query heads split evenly; KV heads split too, or, when there are
fewer KV heads than ranks, each rank keeps the one KV head its query heads use (tp must be a multiple of them).
AWQ weights split the same way: along output features in units of 8 (one int32), along input features in whole
quantization groups, so a shard never cuts a group; a shape that cannot be split raises TPShapeError.

InternLM2's fused wqkv and *.bin checkpoints cannot be sliced on disk: those tensors are read whole on each
rank, then narrowed (correct, but each rank reads the full tensor once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine import loader
from engine.models import entry_for
from engine.models.spec import ModelSpec


class TPShapeError(ValueError):
    pass


@dataclasses.dataclass
class ShardPlan:
    rank: int
    tp: int
    spec: ModelSpec  # the full model
    q_heads: tuple[int, int]  # (first, count) of this rank's query heads
    kv_heads: tuple[int, int]
    inter: tuple[int, int]  # (first, count) intermediate features
    vocab: tuple[int, int]  # (first, count) of real vocabulary rows; padded to vocab_per_rank
    vocab_per_rank: int

    def local_spec(self) -> ModelSpec:
        return dataclasses.replace(self.spec, num_heads=self.q_heads[1], num_kv_heads=self.kv_heads[1],
                                   intermediate_size=self.inter[1], vocab_size=self.vocab_per_rank)


def awq_group_size(spec: ModelSpec) -> int:
    q = spec.quantization_config or {}
    return q.get("group_size", q.get("q_group_size", 128))


def make_plan(spec: ModelSpec, tp: int, rank: int, model_format: str = "hf") -> ShardPlan:
    h, kv, i = spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    what = f"{spec.architecture} (heads {h}, KV heads {kv}, intermediate {i})"
    if h % tp:
        raise TPShapeError(f"--tp {tp} cannot split {what}: {h} attention heads are not divisible by {tp}")
    if kv >= tp and kv % tp:
        raise TPShapeError(f"--tp {tp} cannot split {what}: {kv} KV heads are not divisible by {tp}")
    if kv < tp and tp % kv:
        raise TPShapeError(f"--tp {tp} cannot split {what}: {tp} ranks cannot share {kv} KV heads evenly")
    if i % tp:
        raise TPShapeError(f"--tp {tp} cannot split {what}: intermediate size {i} is not divisible by {tp}")
    if model_format == "awq":
        g = awq_group_size(spec)
        q_in, i_in = h * spec.head_dim // tp, i // tp
        if q_in % g or i_in % g:
            raise TPShapeError(
                f"--tp {tp} cannot split {what} with AWQ group size {g}: each rank's o_proj input ({q_in}) and "
                f"down_proj input ({i_in}) must be whole groups (a shard never splits a quantization group)")
        if (i // tp) % 8 or (h * spec.head_dim // tp) % 8:
            raise TPShapeError(f"--tp {tp} cannot split {what}: AWQ packs 8 output features per int32")
    hq = h // tp
    kv_local = kv // tp if kv >= tp else 1
    kv_first = rank * kv_local if kv >= tp else rank // (tp // kv)
    vp = -(-spec.vocab_size // tp)
    v0 = rank * vp
    return ShardPlan(rank, tp, spec, (rank * hq, hq), (kv_first, kv_local), (rank * (i // tp), i // tp),
                     (v0, max(0, min(spec.vocab_size, v0 + vp) - v0)), vp)


def _slice_of(name: str, shape: tuple[int, ...], plan: ShardPlan) -> tuple[int, int, int] | None:
    """(dim, start, size) of this rank's part of a Llama-named checkpoint tensor; None: replicated."""
    d = plan.spec.head_dim
    suffix = name.rsplit(".", 1)[1]
    is_awq = suffix in ("qweight", "qzeros", "scales")
    if ".embed_tokens." in name or name.startswith("lm_head."):
        return 0, plan.vocab[0], plan.vocab[1]
    column = {".q_proj.": (plan.q_heads[0] * d, plan.q_heads[1] * d),
              ".k_proj.": (plan.kv_heads[0] * d, plan.kv_heads[1] * d),
              ".v_proj.": (plan.kv_heads[0] * d, plan.kv_heads[1] * d),
              ".gate_proj.": plan.inter, ".up_proj.": plan.inter}
    for key, (start, size) in column.items():
        if key in name:
            if not is_awq:
                return 0, start, size  # weight [out, in], bias [out]
            pack = 1 if suffix == "scales" else 8
            return 1, start // pack, size // pack  # qweight/qzeros [.., out / 8], scales [.., out]
    row = {".o_proj.": (plan.q_heads[0] * d, plan.q_heads[1] * d), ".down_proj.": plan.inter}
    for key, (start, size) in row.items():
        if key in name:
            if suffix == "bias":
                return None
            if not is_awq:
                return 1, start, size  # weight [out, in]
            g = 1 if suffix == "qweight" else awq_group_size(plan.spec)
            return 0, start // g, size // g  # qweight [in, out / 8]; qzeros, scales [in / G, ..]
    return None


def _take(t_or_slice, shape, cut, pad_to: int | None) -> torch.Tensor:
    if cut is None:
        return t_or_slice[:] if not isinstance(t_or_slice, torch.Tensor) else t_or_slice
    dim, start, size = cut
    index = tuple(slice(start, start + size) if k == dim else slice(None) for k in range(len(shape)))
    t = t_or_slice[index]
    if pad_to is not None and t.shape[0] < pad_to:  # the last vocab shard: zero rows up to the padded size
        t = torch.cat([t, t.new_zeros(pad_to - t.shape[0], *t.shape[1:])])
    return t.contiguous()


def sharded_tensors(path: Path, plan: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's (Llama name, tensor slice) pairs."""
    spec = plan.spec
    files = sorted(path.glob("*.safetensors"))
    if files and spec.family == "llama":  # names as the model's: slice on disk
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    shape = tuple(sl.get_shape())
                    ln = name[len("language_model."):] if name.startswith("language_model.") else name
                    cut = _slice_of(ln, shape, plan)
                    pad = plan.vocab_per_rank if cut is not None and (".embed_tokens." in ln
                                                                      or ln.startswith("lm_head.")) else None
                    yield ln, _take(sl, shape, cut, pad)
        return
    for name, t in loader.iter_checkpoint(path):  # whole tensors, narrowed here (see the module docstring)
        if name.startswith("language_model."):
            name = name[len("language_model."):]
        pairs = entry_for(spec.architecture).convert_tensor(name, t, spec)
        for ln, tt in pairs:
            cut = _slice_of(ln, tuple(tt.shape), plan)
            pad = plan.vocab_per_rank if cut is not None and (".embed_tokens." in ln or ln.startswith("lm_head.")) \
                else None
            yield ln, _take(tt, tuple(tt.shape), cut, pad)


def load_sharded_model(path: Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device, model_format: str,
                       tp: int, rank: int, load_format: str = "auto") -> tuple[nn.Module, ModelSpec]:
    """This rank's model (local sizes, its slice of every weight) and its local spec (for the KV cache)."""
    plan = make_plan(spec, tp, rank, model_format)
    local = plan.local_spec()
    model = loader.build_model(local, dtype, device, model_format)
    model.model.embed_tokens.vocab_start = plan.vocab[0]
    model.tp_vocab_size = spec.vocab_size  # logits gathered over ranks are cut back to the real vocabulary
    if load_format == "dummy":
        loader.init_dummy_weights(model, seed=rank)
    else:
        loader.load_weights(model, path, local, tensors=sharded_tensors(path, plan))
    for module in model.modules():
        if hasattr(module, "post_load"):
            module.post_load()
    model.eval()
    return model, local
