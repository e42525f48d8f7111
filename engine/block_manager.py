"""Paged KV blocks: allocation, reference counts and the prefix cache.

A full block is identified by the hash of (hash of the blocks before it, its token ids, and extra keys: the content
hashes of images whose placeholder tokens it holds). A block is
registered in the prefix cache only once its KV has been computed, so a request never reads a block that
another request's unfinished (chunked) prefill has yet to fill. Freed blocks keep their hash and stay
findable until they are handed out again (oldest-freed first), so a follow-up turn of a chat finds its
history cached even after the previous request ended.
"""

from __future__ import annotations

from collections import deque

from engine.sequence import PENDING, Sequence


def block_hash(token_ids: list[int], prefix_hash: int, extra_keys: tuple = ()) -> int:
    """extra_keys: e.g. the content hashes of images whose placeholder tokens lie in the block."""
    if extra_keys:
        return hash((prefix_hash, tuple(token_ids), extra_keys))
    return hash((prefix_hash, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.num_prefix_hits = 0  # blocks reused from the cache, over the manager's life

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def _take_free_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, [], 1
        return block_id

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest run of seq's leading full blocks found in the cache. The last token is
        never counted as cached: its logits are needed, so at least one token is always computed."""
        if not self.enable_prefix_caching:
            return []
        hits, prefix_hash = [], -1
        num_full = (len(seq) - 1) // self.block_size
        for i in range(num_full):
            tokens = seq.block_tokens(i)
            prefix_hash = block_hash(tokens, prefix_hash, seq.block_extra_keys(i))
            block_id = self.hash_to_block_id.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def num_blocks_needed(self, seq: Sequence) -> int:
        """New blocks seq's allocation would take from the free list (cache hits on free blocks count too)."""
        hits = self._cached_prefix(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks - len(hits) + revived

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_blocks_needed(seq) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, "sequence already holds blocks"
        hits = self._cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_block_ids.remove(block_id)
            block.ref_count += 1
        self.num_prefix_hits += len(hits)
        seq.block_table = hits + [self._take_free_block() for _ in range(seq.num_blocks - len(hits))]
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens

    def allocate_private(self, seq: Sequence) -> bool:
        """Fresh blocks for all of seq, none shared with the prefix cache nor registered in it (prompt scoring
        needs the logits of every position, so nothing may come from the cache). False when too few are free."""
        assert not seq.block_table, "sequence already holds blocks"
        if seq.num_blocks > self.num_free_blocks:
            return False
        seq.block_table = [self._take_free_block() for _ in range(seq.num_blocks)]
        seq.num_cached_tokens = seq.num_computed_tokens = 0
        return True

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks, seq.last_block_hash = 0, -1

    def can_append(self, seq: Sequence) -> bool:
        """Room for the KV of seq's newest token, which the next decode step feeds."""
        return len(seq.block_table) >= seq.num_blocks or self.num_free_blocks >= 1

    def append_slot(self, seq: Sequence) -> None:
        """Give seq a new block when its newest token starts one (called when scheduling a decode step)."""
        if len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free_block())

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Put seq's full blocks whose KV is now computed into the prefix cache (only the ones not done yet)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, len(seq)) // self.block_size
        i, prefix_hash = seq.num_hashed_blocks, seq.last_block_hash
        while i < num_full:
            tokens = seq.block_tokens(i)
            if PENDING in tokens:  # a token still in flight: register once it is known
                break
            prefix_hash = block_hash(tokens, prefix_hash, seq.block_extra_keys(i))
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1:
                block.hash, block.token_ids = prefix_hash, tokens
            self.hash_to_block_id.setdefault(prefix_hash, block.block_id)
            i += 1
        seq.num_hashed_blocks, seq.last_block_hash = i, prefix_hash
