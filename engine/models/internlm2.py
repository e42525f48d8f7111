"""InternLM2 / 2.5 checkpoints on the Llama model: rename tensors and un-pack `attention.wqkv`.

wqkv's output features are grouped per KV head: for each KV head g, the q heads of group g, then k head g,
then v head g (head_dim features each). This works on any tensor whose output dimension is `out_dim`, with
`pack` output features per element along it, so AWQ's qweight / qzeros ([in, out / 8]) and scales
([in / G, out]) split the same way as a plain [out, in] weight.
"""

from __future__ import annotations

import torch

from engine.models.llama import LlamaForCausalLM
from engine.models.spec import ModelEntry, ModelSpec, parse_decoder_spec

INTERNLM2_TO_LLAMA = (  # checkpoint name piece -> Llama name piece (the quantizer's loader uses it too)
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)


def split_wqkv(t: torch.Tensor, num_heads: int, num_kv_heads: int, out_dim: int = 0,
               pack: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Un-pack a wqkv tensor into (q, k, v) laid out as separate Llama projections (head_dim / pack elements per
    head along `out_dim`, read off the tensor's shape)."""
    group = num_heads // num_kv_heads
    t = t.movedim(out_dim, 0)
    rest = t.shape[1:]
    d = t.shape[0] // (num_kv_heads * (group + 2))
    t = t.reshape(num_kv_heads, group + 2, d, *rest)
    q = t[:, :group].reshape(num_heads * d, *rest)
    k = t[:, group].reshape(num_kv_heads * d, *rest)
    v = t[:, group + 1].reshape(num_kv_heads * d, *rest)
    return tuple(x.movedim(0, out_dim).contiguous() for x in (q, k, v))


def merge_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Inverse of split_wqkv; works for any tensor whose dim 0 is output channels (weights, ints, scales, biases)."""
    groups = num_heads // num_kv_heads
    rest = q.shape[1:]
    head_dim = q.shape[0] // num_heads
    qg = q.reshape(num_kv_heads, groups, head_dim, *rest)
    kg = k.reshape(num_kv_heads, 1, head_dim, *rest)
    vg = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((num_heads + 2 * num_kv_heads) * head_dim, *rest)


_LLAMA_TO_INTERNLM2 = (("lm_head.", "output."), *((new, old) for old, new in INTERNLM2_TO_LLAMA))


def llama_to_internlm2_name(name: str) -> str:
    """Llama-layout module or tensor name (not q/k/v, which merge into wqkv) -> InternLM2 checkpoint name.
    First matching rule wins: a rule starting with '.' matches anywhere, others only at the start."""
    name += "."
    for llama, internlm2 in _LLAMA_TO_INTERNLM2:
        if (llama.startswith(".") and llama in name) or name.startswith(llama):
            return name.replace(llama, internlm2, 1)[:-1]
    return name[:-1]


def convert_tensor(name: str, t: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """One InternLM2 checkpoint tensor -> the Llama-named tensor(s) it holds."""
    return to_llama_tensors(name, t, spec.num_heads, spec.num_kv_heads)


def to_llama_tensors(name: str, t: torch.Tensor, num_heads: int, num_kv_heads: int) -> list[tuple[str, torch.Tensor]]:
    """convert_tensor from head counts alone (the quantizer reads them off config.json)."""
    if name == "output.weight":
        return [("lm_head.weight", t)]
    if ".attention.wqkv." in name:
        suffix = name.rsplit(".", 1)[1]  # weight | bias | qweight | qzeros | scales
        out_dim, pack = {"weight": (0, 1), "bias": (0, 1), "qweight": (1, 8), "qzeros": (1, 8), "scales": (1, 1)}[
            suffix
        ]
        q, k, v = split_wqkv(t, num_heads, num_kv_heads, out_dim, pack)
        base = name.replace(".attention.wqkv.", ".self_attn.{}.")
        return [(base.format("q_proj"), q), (base.format("k_proj"), k), (base.format("v_proj"), v)]
    for old, new in INTERNLM2_TO_LLAMA:
        if old in name:
            return [(name.replace(old, new), t)]
    return [(name, t)]


def parse_spec(cfg: dict, arch: str) -> ModelSpec:
    return parse_decoder_spec(cfg, arch, family="internlm2")


ENTRY = ModelEntry("internlm2", parse_spec, LlamaForCausalLM, convert_tensor)
