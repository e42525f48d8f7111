"""Llama-family decoder for the paged engine: Llama 2/3, Mistral and Qwen2 (qkv bias, tied embeddings) via
ModelSpec flags; InternLM2 reuses it through a checkpoint-name mapping (models/internlm2.py).

q/k/v and gate/up are fused linears; the checkpoint's separate projections load into their shards
(`packed_modules_mapping`). Linear layers come from a factory so a quantized linear (AWQ) drops in without
touching this file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.kernels import ops
from engine.layers.attention import AttentionMetadata, PagedAttention
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.parallel_linear import VocabParallelEmbedding  # TP hook
from engine.layers.rotary import RotaryEmbedding
from engine.models.spec import ModelEntry, ModelSpec, parse_decoder_spec
from engine.parallel import comm  # TP hook: all-reduce / all-gather, no-ops at tp = 1

LinearFactory = Callable[..., nn.Module]  # (in_features, out_features, bias, dtype, shard_sizes=None, prefix="")


def plain_linear(in_features, out_features, bias, dtype, shard_sizes=None, prefix=""):
    return Linear(in_features, out_features, bias, dtype, shard_sizes)


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, dtype, make_linear: LinearFactory, prefix: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv_proj = make_linear(spec.hidden_size, q_size + 2 * kv_size, spec.attention_bias, dtype,
                                    shard_sizes=[q_size, kv_size, kv_size], prefix=f"{prefix}.qkv_proj")
        self.o_proj = make_linear(q_size, spec.hidden_size, False, dtype, prefix=f"{prefix}.o_proj")
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, cos_sin, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, meta, cos_sin)  # RoPE is applied there, fused into the KV-cache write
        return comm.all_reduce(self.o_proj(out.reshape(-1, self.q_size)))  # TP hook: row-parallel sum


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec, dtype, make_linear: LinearFactory, prefix: str):
        super().__init__()
        i = spec.intermediate_size
        self.gate_up_proj = make_linear(spec.hidden_size, 2 * i, False, dtype, shard_sizes=[i, i],
                                        prefix=f"{prefix}.gate_up_proj")
        self.down_proj = make_linear(i, spec.hidden_size, False, dtype, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(gate) * up inside down's kernel; TP hook: row-parallel sum
        return comm.all_reduce(self.down_proj(self.gate_up_proj(x), silu_mul=True))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, dtype, make_linear: LinearFactory, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(spec, dtype, make_linear, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(spec, dtype, make_linear, f"{prefix}.mlp")

    def forward(self, cos_sin, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(cos_sin, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, dtype, make_linear: LinearFactory):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        # cos/sin tables; gathered once per step (lookup) and applied by each layer's attention
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(spec, dtype, make_linear, f"model.layers.{i}") for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, meta, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        cos_sin = self.rotary.lookup(positions)
        for layer in self.layers:
            x, residual = layer(cos_sin, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, make_linear: LinearFactory = plain_linear):
        super().__init__()
        self.spec = spec
        self.tp_vocab_size = None  # TP hook: set by the shard loader
        self.model = LlamaModel(spec, dtype, make_linear)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype)
        self.lm_head.weight.requires_grad_(False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, inputs_embeds)  # [num_tokens, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(hidden, self.lm_head.weight).float()  # [num_rows, vocab]
        if self.tp_vocab_size is not None:  # TP hook: vocab-parallel lm_head, gathered and cut to the vocab
            logits = comm.all_gather_last(logits)[:, : self.tp_vocab_size]
        return logits

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]


def keep_tensor_name(name: str, tensor: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """Llama-family checkpoints already use this module's names (q/k/v and gate/up load into fused shards)."""
    return [(name, tensor)]


ENTRY = ModelEntry("llama", parse_decoder_spec, LlamaForCausalLM, keep_tensor_name)
