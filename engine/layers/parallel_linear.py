"""Vocab-parallel embedding for tensor parallelism (column/row-parallel linears need no class of their own:
a rank's Linear / AWQLinear is built at its local size and loads its slice, engine/parallel/shard_loader.py).

Each rank holds rows [vocab_start, vocab_start + num_embeddings) of the (padded) vocabulary; ids outside
that range embed to zero and one all-reduce sums the ranks. With tp = 1 it is a plain nn.Embedding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.parallel import comm


class VocabParallelEmbedding(nn.Embedding):
    vocab_start = 0  # set per rank by the shard loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if comm.world_size() == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)  # [num_tokens, hidden]
        x = x.masked_fill(outside[:, None], 0.0)
        return comm.all_reduce(x)
