"""BlockManager on its own: allocation and freeing, reference counts of shared blocks, prefix-cache hits (and
misses), blocks that stay findable after they are freed, and the decode-time slot append."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import GenerationConfig
from engine.sequence import PENDING, SamplingState, Sequence

BS = 4  # tokens per block


def seq(tokens, max_tokens: int = 64) -> Sequence:
    return Sequence(list(tokens), SamplingState(GenerationConfig(), 0, frozenset()), max_tokens, BS)


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """As after a prefill step that computed all of s: its full blocks go into the cache."""
    s.num_computed_tokens = len(s)
    bm.register_computed_blocks(s)
    return s


def test_allocate_and_deallocate_take_and_return_blocks():
    bm = BlockManager(8, BS)
    a = seq(range(10))  # 3 blocks (4 + 4 + 2)
    assert a.num_blocks == 3 and bm.can_allocate(a) and bm.num_blocks_needed(a) == 3
    bm.allocate(a)
    assert len(a.block_table) == 3 and len(set(a.block_table)) == 3
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    assert a.num_cached_tokens == 0 and a.num_computed_tokens == 0
    bm.deallocate(a)
    assert a.block_table == [] and bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_can_allocate_says_no_when_blocks_run_out():
    bm = BlockManager(3, BS)
    bm.allocate(seq(range(8)))  # 2 blocks
    assert not bm.can_allocate(seq(range(100, 109)))  # needs 3, 1 free
    assert bm.can_allocate(seq(range(100, 104)))


def test_a_shared_prefix_is_one_block_with_two_references():
    bm = BlockManager(8, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    computed(bm, a)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 50, 51])
    assert bm.num_blocks_needed(b) == 1  # the two cached blocks are in use by a: only the tail is new
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    assert b.num_cached_tokens == b.num_computed_tokens == 2 * BS
    assert bm.num_prefix_hits == 2
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    assert bm.num_free_blocks == 8 - 3  # a's own last block is free, the shared ones are b's
    bm.deallocate(b)
    assert bm.num_free_blocks == 8


def test_prefix_hit_stops_at_the_first_differing_block_and_never_covers_the_last_token():
    bm = BlockManager(16, BS)
    a = seq(range(12))
    bm.allocate(a)
    computed(bm, a)
    first_differs = seq([99, 1, 2, 3, *range(4, 12)])
    second_differs = seq([0, 1, 2, 3, 99, 5, 6, 7, *range(8, 12)])
    exact = seq(range(12))  # 3 full blocks, but the last token must be computed: 2 hits
    assert bm._cached_prefix(first_differs) == []
    assert bm._cached_prefix(second_differs) == a.block_table[:1]
    assert bm._cached_prefix(exact) == a.block_table[:2]
    bm.allocate(exact)
    assert exact.num_computed_tokens == 2 * BS and exact.is_prefilling


def test_same_block_tokens_after_a_different_prefix_do_not_hit():
    bm = BlockManager(16, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    bm.allocate(a)
    computed(bm, a)
    b = seq([9, 9, 9, 9, 5, 6, 7, 8, 0])  # block 1 equals a's block 1, but its prefix differs
    assert bm._cached_prefix(b) == []


def test_freed_blocks_stay_cached_until_handed_out_again_oldest_first():
    bm = BlockManager(4, BS)
    a = seq(range(9))  # 3 blocks, 2 full
    bm.allocate(a)
    computed(bm, a)
    cached = a.block_table[:2]
    bm.deallocate(a)
    follow_up = seq([*range(9), 42])  # the next chat turn: same history, longer
    assert bm._cached_prefix(follow_up) == cached
    assert bm.num_blocks_needed(follow_up) == 3  # reviving free cached blocks takes them off the free list too
    other = seq(range(100, 104))  # 1 block: the oldest free one (never used), not a cached one
    bm.allocate(other)
    assert other.block_table[0] not in cached
    assert bm._cached_prefix(follow_up) == cached
    bm.deallocate(other)
    big = seq(range(200, 216))  # all 4 blocks: the cached ones are handed out and forgotten
    bm.allocate(big)
    assert bm._cached_prefix(follow_up) == []
    assert all(bm.blocks[b].hash == -1 for b in big.block_table)


def test_revived_cached_blocks_leave_the_free_list():
    bm = BlockManager(4, BS)
    a = seq(range(9))
    bm.allocate(a)
    computed(bm, a)
    cached = a.block_table[:2]
    bm.deallocate(a)
    b = seq(range(10))
    bm.allocate(b)
    assert b.block_table[:2] == cached and b.num_cached_tokens == 2 * BS
    assert not set(cached) & set(bm.free_block_ids)
    assert bm.num_free_blocks == 4 - 3


def test_blocks_with_a_pending_token_are_registered_once_it_is_known():
    bm = BlockManager(8, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7])
    bm.allocate(a)
    a.num_computed_tokens = len(a)
    a.token_ids.append(PENDING)  # a step in flight: block 1 is full but its last token unknown
    bm.append_slot(a)
    a.num_computed_tokens = len(a)
    bm.register_computed_blocks(a)
    assert a.num_hashed_blocks == 1
    a.token_ids[-1] = 8
    bm.register_computed_blocks(a)
    assert a.num_hashed_blocks == 2
    assert bm._cached_prefix(seq([1, 2, 3, 4, 5, 6, 7, 8, 9])) == a.block_table[:2]


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq(range(9))
    bm.allocate(a)
    computed(bm, a)
    b = seq(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)


def test_append_slot_adds_a_block_only_when_the_newest_token_starts_one():
    bm = BlockManager(3, BS)
    a = seq(range(4))
    bm.allocate(a)
    assert bm.can_append(a)
    bm.append_slot(a)
    assert len(a.block_table) == 1  # 4 tokens fit the one block
    a.token_ids.append(4)
    assert bm.can_append(a)
    bm.append_slot(a)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 1
    b = seq(range(100, 104))
    bm.allocate(b)
    b.token_ids.append(5)
    assert not bm.can_append(b)  # its 5th token needs a block and none is free
