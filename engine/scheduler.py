"""Continuous batching: which sequences run in the next step, as a prefill step or a decode step.

- New requests join the running batch as soon as blocks and `max_batch_size` allow. Sequences belong to groups
  (one API request's n choices and prompts share one); admission is fair between groups: the next one admitted is
  the oldest waiting sequence of the group with the fewest running, and when the batch (or the cache) is full, a
  group holding more than its share (max_batch_size / groups) gives one sequence back (preempted, recomputed
  later) so another group's waiting sequence can start. One n=128 request cannot hold every slot while a short
  request waits.
- A prefill step packs up to `max_prefill_token_num` prompt tokens; a longer prompt is prefilled in
  chunks over several steps. When sequences are decoding, prefill and decode steps alternate, so a long
  prompt never stalls the streams already running.
- When a decode step finds no free block, the most recently admitted sequence is preempted: its blocks
  are freed and it goes back to the front of the queue, to be recomputed later (its prefix blocks are
  often still in the prefix cache). No request fails because the cache is full.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence feeds this step (1 for decode)
    is_prefill: bool

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_token_num: int):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_token_num = max_prefill_token_num
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.last_step_was_prefill = False
        self.num_preemptions = 0
        self.num_fair_preemptions = 0  # of which to give another request its share of the batch

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take seq out (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.deallocate(seq)

    def schedule(self) -> ScheduledBatch | None:
        has_decodable = any(not s.is_prefilling for s in self.running)
        wants_prefill = bool(self.waiting) or any(s.is_prefilling for s in self.running)
        if wants_prefill and not (has_decodable and self.last_step_was_prefill):
            batch = self._schedule_prefill()
            if batch is not None:
                self.last_step_was_prefill = True
                return batch
        self.last_step_was_prefill = False
        if has_decodable:
            return self._schedule_decode()
        return None

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_prefill_token_num
        seqs, counts = [], []
        for seq in self.running:  # chunked prompts already admitted go first
            if budget == 0:
                break
            if seq.is_prefilling:
                n = min(len(seq) - seq.num_computed_tokens, budget)
                seqs.append(seq)
                counts.append(n)
                budget -= n
        while self.waiting and budget > 0:
            seq = self._next_waiting()
            while len(self.running) >= self.max_batch_size or not self.block_manager.can_allocate(seq):
                if not self._make_room_for(seq, keep=seqs):
                    break
            if len(self.running) >= self.max_batch_size or not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        if not seqs:
            return None
        return ScheduledBatch(seqs, counts, is_prefill=True)

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or seq.is_prefilling:  # preempted meanwhile, or mid-prefill
                continue
            if len(seq) >= seq.max_tokens:  # its last token is in flight: nothing more to compute
                continue
            while not self.block_manager.can_append(seq):
                victim = self._pick_victim(exclude=seq)
                if victim is None:
                    break
                self._preempt(victim)
                if victim in scheduled:
                    scheduled.remove(victim)
            if not self.block_manager.can_append(seq):
                self._preempt(seq)  # alone and still no room: wait until others finish
                continue
            self.block_manager.append_slot(seq)
            scheduled.append(seq)
            if len(scheduled) == self.max_batch_size:
                break
        if not scheduled:
            return None
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False)

    def _running_per_group(self) -> dict:
        counts: dict = {}
        for seq in self.running:
            counts[seq.group] = counts.get(seq.group, 0) + 1
        return counts

    def _next_waiting(self) -> Sequence:
        """The oldest waiting sequence of the group with the fewest running sequences."""
        counts = self._running_per_group()
        best, best_count = self.waiting[0], counts.get(self.waiting[0].group, 0)
        if best_count == 0:
            return best
        seen = {best.group}
        for seq in self.waiting:
            if seq.group in seen:
                continue
            seen.add(seq.group)
            count = counts.get(seq.group, 0)
            if count < best_count:
                best, best_count = seq, count
                if count == 0:
                    break
        return best

    def _make_room_for(self, seq: Sequence, keep: list[Sequence]) -> bool:
        """Preempt one sequence of the group furthest over its fair share, if `seq`'s group is under it; False when
        none is (then `seq` waits, as it always did, for running sequences to finish)."""
        counts = self._running_per_group()
        groups = set(counts) | {s.group for s in self.waiting}
        share = max(1, self.max_batch_size // max(1, len(groups)))
        if counts.get(seq.group, 0) >= share:
            return False
        over = max(counts, key=counts.get, default=None)
        if over is None or counts[over] <= share:
            return False
        for victim in reversed(self.running):
            if victim.group == over and victim not in keep:
                self._preempt(victim)
                self.num_fair_preemptions += 1
                return True
        return False

    def _pick_victim(self, exclude: Sequence) -> Sequence | None:
        for seq in reversed(self.running):
            if seq is not exclude:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
