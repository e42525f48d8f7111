"""Scheduler on its own (over a real BlockManager, without a model): FIFO admission within max_batch_size and
the free blocks, chunked prefill under max_prefill_token_num, prefill and decode steps alternating, preemption
of the most recently admitted sequence back to the front of the queue, and removal freeing blocks."""

from __future__ import annotations

import itertools

from engine.block_manager import BlockManager
from engine.config import GenerationConfig
from engine.scheduler import Scheduler
from engine.sequence import SamplingState, Sequence, SequenceStatus

BS = 4
_next_token = itertools.count(1000)


def seq(n: int, max_tokens: int = 64) -> Sequence:
    start = next(_next_token) * 100  # distinct prompts: no prefix-cache hits between them
    return Sequence(list(range(start, start + n)), SamplingState(GenerationConfig(), 0, frozenset()), max_tokens, BS)


def run(batch) -> None:
    """What the engine does after a step: the fed tokens are computed; a sequence with all of them computed
    samples one more token."""
    for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        s.num_computed_tokens += n
        if s.num_computed_tokens == len(s):
            s.token_ids.append(next(_next_token))


def test_admission_is_fifo_within_the_batch_size():
    sched = Scheduler(BlockManager(64, BS), max_batch_size=2, max_prefill_token_num=1000)
    a, b, c = seq(5), seq(6), seq(7)
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a, b] and batch.num_new_tokens == [5, 6]
    assert list(sched.waiting) == [c] and a.status == b.status == SequenceStatus.RUNNING
    assert c.status == SequenceStatus.WAITING and not c.block_table


def test_admission_waits_for_free_blocks_and_keeps_order():
    sched = Scheduler(BlockManager(4, BS), max_batch_size=8, max_prefill_token_num=1000)
    a, b, c = seq(12), seq(8), seq(2)  # 3, 2 and 1 blocks: b does not fit beside a, and c waits behind b
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [a] and list(sched.waiting) == [b, c]
    sched.remove(a)
    assert sched.block_manager.num_free_blocks == 4
    batch = sched.schedule()
    assert batch.seqs == [b, c]


def test_long_prompts_prefill_in_chunks_and_admitted_chunks_go_first():
    sched = Scheduler(BlockManager(64, BS), max_batch_size=8, max_prefill_token_num=8)
    a, b = seq(20), seq(3)
    sched.add(a)
    sched.add(b)
    counts = []
    for _ in range(3):
        batch = sched.schedule()
        assert batch.is_prefill and batch.num_tokens <= 8
        counts.append(list(zip(batch.seqs, batch.num_new_tokens)))
        run(batch)
    assert counts[0] == [(a, 8)]
    assert counts[1] == [(a, 8)]
    assert counts[2] == [(a, 4), (b, 3)]  # a's last chunk first, then b fills the budget
    assert not a.is_prefilling and len(a) == 21  # a sampled its first token


def test_prefill_and_decode_steps_alternate():
    sched = Scheduler(BlockManager(64, BS), max_batch_size=8, max_prefill_token_num=4)
    a = seq(3)
    sched.add(a)
    run(sched.schedule())  # a prefilled (a prefill step), now decoding
    b = seq(8)  # two prefill chunks of 4
    sched.add(b)
    kinds = []
    for _ in range(5):
        batch = sched.schedule()
        kinds.append(("prefill" if batch.is_prefill else "decode", ["a" if s is a else "b" for s in batch.seqs]))
        run(batch)
    assert kinds == [("decode", ["a"]), ("prefill", ["b"]), ("decode", ["a"]), ("prefill", ["b"]),
                     ("decode", ["a", "b"])]


def test_decode_without_room_preempts_the_most_recent_back_to_the_front():
    bm = BlockManager(5, BS)
    sched = Scheduler(bm, max_batch_size=8, max_prefill_token_num=1000)
    a, b, c = seq(4), seq(5), seq(5)  # 1 + 2 + 2 blocks: the cache is full after prefill
    for s in (a, b, c):
        sched.add(s)
    run(sched.schedule())
    assert bm.num_free_blocks == 0
    late = seq(2)
    sched.add(late)
    batch = sched.schedule()  # a's 5th token needs a block: c, the most recently admitted, makes room
    assert not batch.is_prefill and batch.seqs == [a, b]
    assert list(sched.waiting) == [c, late]  # c goes back to the front of the queue
    assert c.status == SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert len(c) == 6  # its sampled token stays: it is recomputed, not lost


def test_a_sequence_alone_without_room_waits_instead_of_failing():
    bm = BlockManager(1, BS)
    sched = Scheduler(bm, max_batch_size=8, max_prefill_token_num=1000)
    a = seq(4)
    sched.add(a)
    run(sched.schedule())
    assert sched.schedule() is None  # its 5th token needs a second block that does not exist
    assert list(sched.waiting) == [a] and a.status == SequenceStatus.WAITING and bm.num_free_blocks == 1


def test_remove_frees_blocks_of_running_and_waiting_sequences():
    bm = BlockManager(16, BS)
    sched = Scheduler(bm, max_batch_size=1, max_prefill_token_num=1000)
    a, b = seq(9), seq(9)
    sched.add(a)
    sched.add(b)
    run(sched.schedule())
    assert bm.num_free_blocks == 16 - 3
    sched.remove(b)  # waiting, holds no blocks
    sched.remove(a)
    assert not sched.has_work and bm.num_free_blocks == 16


def grouped(n: int, group: str) -> Sequence:
    s = seq(n)
    s.group = group
    return s


def test_a_big_group_gives_a_waiting_group_its_share_of_the_batch():
    sched = Scheduler(BlockManager(256, BS), max_batch_size=4, max_prefill_token_num=1000)
    big = [grouped(3, "big") for _ in range(6)]
    for s in big:
        sched.add(s)
    run(sched.schedule())
    assert [s.group for s in sched.running] == ["big"] * 4  # alone, it may take the whole batch
    short = grouped(3, "short")
    sched.add(short)
    run(sched.schedule())  # a decode step comes first (prefill and decode alternate)
    batch = sched.schedule()
    assert short in batch.seqs and short.status == SequenceStatus.RUNNING  # admitted ahead of big's waiting two
    assert sched.num_fair_preemptions == 1 and len(sched.running) == 4
    preempted = [s for s in big if s.status == SequenceStatus.WAITING]
    assert len(preempted) == 3 and not any(s.block_table for s in preempted)
    run(batch)
    for _ in range(3):  # big keeps at least its share: no further preemption while short runs
        run(sched.schedule())
    assert sched.num_fair_preemptions == 1 and short in sched.running
