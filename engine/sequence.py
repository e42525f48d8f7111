"""One request's state: its tokens, its KV blocks, how far its prefill got, and how it should be sampled."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

from engine.config import GenerationConfig
from engine.inputs import MultiModalItem, block_extra_keys


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SamplingState:
    """Per-request sampling settings resolved to the values the sampler needs."""

    gen_config: GenerationConfig
    seed: int
    eos_token_ids: frozenset[int]


_seq_counter = itertools.count()
PENDING = -1  # a token sampled on the device whose value the host has not read yet (overlapped steps)


class Sequence:
    def __init__(self, token_ids: list[int], sampling: SamplingState, max_tokens: int, block_size: int,
                 mm_items: tuple[MultiModalItem, ...] = (), group: object = None):
        self.seq_id = next(_seq_counter)
        self.group = self.seq_id if group is None else group  # the scheduler shares the batch fairly between groups
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.sampling = sampling
        self.max_tokens = max_tokens  # prompt + generated, never more (session_len / max_new_tokens)
        self.block_size = block_size
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # tokens whose KV sat in the prefix cache at allocation
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (prefill progress)
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.logprobs: list[dict] = []
        self.num_hashed_blocks = 0  # leading blocks already registered in the prefix cache
        self.last_block_hash = -1
        self.pending_row = -1  # row of the in-flight step's token tensor holding this sequence's PENDING token
        self.request = None  # the engine's request record (set when the engine takes the request)
        self.mm_items = tuple(mm_items)  # images whose features fill placeholder positions of the prompt
        self.mrope_delta: int | None = None  # M-RoPE models: rope position - token index after the prompt

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    @property
    def is_prefilling(self) -> bool:
        """True while more than the last token lack KV (a new, chunked or preempted request); decode feeds
        exactly the last token."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]


    def block_extra_keys(self, i: int) -> tuple[int, ...]:
        """Extra prefix-cache keys of block i: content hashes of the images with placeholders in it."""
        if not self.mm_items:
            return ()
        return block_extra_keys(self.mm_items, i * self.block_size, (i + 1) * self.block_size)
