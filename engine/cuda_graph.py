"""Decode steps replayed from captured CUDA graphs: one graph per batch size in a ladder (1, 2, 4, 8, 16, 24,
32, ... max_batch_size), all sharing one memory pool. A batch runs on the smallest graph that holds it; the
padding rows write no KV (slot -1) and attend over one token, and their logits are dropped.

Inputs go through static buffers; the block table buffer is as wide as session_len needs, so any decode
step fits. Everything between the input copies and the logits read is one graph launch: no Python per layer.
"""

from __future__ import annotations

import torch

from engine.layers.attention import AttentionMetadata


def batch_size_ladder(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch_size + 1, 8))
    return sorted({s for s in sizes if s <= max_batch_size} | {max_batch_size})


class CudaGraphDecoder:
    def __init__(self, model, max_batch_size: int, max_blocks_per_seq: int, device: torch.device):
        self.model = model
        self.device = device
        self.batch_sizes = batch_size_ladder(max_batch_size)
        n = max(self.batch_sizes)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.kv_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(is_prefill=False, slot_mapping=self.slot_mapping[:bs],
                                 block_tables=self.block_tables[:bs], kv_lens=self.kv_lens[:bs])

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        for bs in reversed(self.batch_sizes):  # largest first, so smaller graphs reuse its pool memory
            self._forward(bs)  # warm-up: compiles kernels, sets up handles
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)

    def can_run(self, batch_size: int, num_blocks: int) -> bool:
        return batch_size <= self.batch_sizes[-1] and num_blocks <= self.block_tables.shape[1]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = input_ids.shape[0]
        bs = next(s for s in self.batch_sizes if s >= b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.kv_lens[:b].copy_(meta.kv_lens)
        self.block_tables[:b, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if bs > b:
            self.slot_mapping[b:bs].fill_(-1)
            self.kv_lens[b:bs].fill_(1)
        self.graphs[bs].replay()
        return self.logits[bs][:b]
