"""InternLM2 / 2.5 checkpoints on the Llama model: rename tensors and un-pack `attention.wqkv`.

wqkv's output features are grouped per KV head: for each KV head g, the q heads of group g, then k head g,
then v head g (head_dim features each). This works on any tensor whose output dimension is `out_dim`, with
`pack` output features per element along it, so AWQ's qweight / qzeros ([in, out / 8]) and scales
([in / G, out]) split the same way as a plain [out, in] weight.
"""

from __future__ import annotations

import torch

from engine.models.spec import ModelSpec

INTERNLM2_TO_LLAMA = (  # checkpoint name piece -> Llama name piece (quant/arch.py uses it too)
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)


def split_wqkv(t: torch.Tensor, spec: ModelSpec, out_dim: int, pack: int = 1) -> tuple[torch.Tensor, ...]:
    """Un-pack a wqkv tensor into (q, k, v) laid out as separate Llama projections."""
    group = spec.num_heads // spec.num_kv_heads
    d = spec.head_dim // pack
    t = t.movedim(out_dim, 0)
    rest = t.shape[1:]
    t = t.reshape(spec.num_kv_heads, group + 2, d, *rest)
    q = t[:, :group].reshape(spec.num_heads * d, *rest)
    k = t[:, group].reshape(spec.num_kv_heads * d, *rest)
    v = t[:, group + 1].reshape(spec.num_kv_heads * d, *rest)
    return tuple(x.movedim(0, out_dim).contiguous() for x in (q, k, v))


def convert_tensor(name: str, t: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """One InternLM2 checkpoint tensor -> the Llama-named tensor(s) it holds."""
    if name == "output.weight":
        return [("lm_head.weight", t)]
    if ".attention.wqkv." in name:
        suffix = name.rsplit(".", 1)[1]  # weight | bias | qweight | qzeros | scales
        out_dim, pack = {"weight": (0, 1), "bias": (0, 1), "qweight": (1, 8), "qzeros": (1, 8), "scales": (1, 1)}[
            suffix
        ]
        q, k, v = split_wqkv(t, spec, out_dim, pack)
        base = name.replace(".attention.wqkv.", ".self_attn.{}.")
        return [(base.format("q_proj"), q), (base.format("k_proj"), k), (base.format("v_proj"), v)]
    for old, new in INTERNLM2_TO_LLAMA:
        if old in name:
            return [(name.replace(old, new), t)]
    return [(name, t)]
