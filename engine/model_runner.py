"""Runs the model for one scheduled batch: builds input tensors and attention metadata, owns the paged KV
cache (sized by cache_max_entry_count), computes logits only where a token is sampled, and samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.cuda_graph import CudaGraphDecoder
from engine.encoder_cache import EncoderCache, image_embeddings
from engine.kernels.reference import KV_GROUPS
from engine.layers.attention import AttentionMetadata, KVCache
from engine.layers.sampler import SamplingBatch, sample
from engine.models.spec import ModelSpec
from engine.parallel import comm  # TP hook: every rank uses the smallest block count of all ranks
from engine.scheduler import ScheduledBatch
from engine.sequence import PENDING, Sequence

log = logging.getLogger(__name__)


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype, quant_policy: int) -> int:
    """Cache bytes one token takes over all layers, keys and values, scales and zeros included."""
    elem = torch.finfo(dtype).bits // 8
    if quant_policy == 0:
        per_head = spec.head_dim * elem
    else:
        values = spec.head_dim if quant_policy == 8 else spec.head_dim // 2
        per_head = values + KV_GROUPS[quant_policy] * 2 * scale_zero_dtype(dtype).itemsize  # (scale, min) pairs
    return 2 * spec.num_layers * spec.num_kv_heads * per_head


def scale_zero_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float32 else torch.float16


def max_vision_tiles(spec: ModelSpec, config: EngineConfig) -> int:
    """The most tower inputs (tiles) one step can encode: the images a prefill step's tokens can cover (each at
    least its smallest feature count; one partial image at each end) times the tiles of one image, and no more
    than the running requests' images."""
    vision = spec.vision
    images = min(config.max_prefill_token_num // vision.rows_per_tile + 2,
                 config.max_batch_size * max(1, config.limit_images_per_prompt))
    tiles = 1
    if vision.anyres:
        tile = vision.clip.image_size
        tiles = 1 + max(-(-h // tile) * -(-w // tile) for h, w in vision.grid_pinpoints)
    return images * tiles


@dataclass
class StepHandle:
    """A launched step: its batch, the sequences that sample, and the device/host token buffers."""

    batch: ScheduledBatch
    sampled_seqs: list[Sequence]
    tokens: torch.Tensor | None  # [len(sampled_seqs)] on the device
    host: torch.Tensor | None  # pinned copy, valid once `event` has completed
    event: object | None
    logprob_info: tuple | None


class ModelRunner:
    def __init__(self, model, spec: ModelSpec, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 tp_group=None):
        self.model, self.spec, self.config = model, spec, config
        self.tp_group = tp_group  # TP hook: rank 0's engine.parallel.launcher.TPGroup (broadcasts each step); else None
        self.device, self.dtype = device, dtype
        self.block_size = config.cache_block_seq_len
        self.weights_bytes = sum(
            t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values()
        )
        self.encoder_cache, self.vision_bytes = None, 0
        self.mrope = getattr(model, "uses_mrope", False)  # Qwen2-VL: 3-row (t, h, w) positions for prefill steps
        self.max_vision_tiles = self.vision_activation_bytes = self.vision_reserved_bytes = 0
        if getattr(model, "is_multimodal", False):  # vision tower + projector: reported apart from the LM weights
            self.vision_bytes = model.vision_bytes
            self.weights_bytes -= self.vision_bytes
            self.encoder_cache = EncoderCache(config.encoder_cache_bytes)
            # tile-based towers (LLaVA): the activations of the most tiles one step can encode are measured; towers
            # with native-resolution inputs (Qwen2-VL) reserve only the caches for now
            tiled = hasattr(spec.vision, "rows_per_tile")
            self.max_vision_tiles = max_vision_tiles(spec, config) if tiled else 0
            if device.type == "cuda":  # held apart before the KV cache takes its share of what is free
                self.vision_activation_bytes = self._measure_vision_activations() if tiled else 0
                self.vision_reserved_bytes = (config.encoder_cache_bytes + config.image_memo_bytes
                                              + self.vision_activation_bytes)
        self.kv_bytes_per_token = kv_bytes_per_token(spec, dtype, config.quant_policy)
        self.num_blocks = self._plan_num_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        for attn, cache in zip(model.attention_layers(), self.kv_caches):
            attn.kv_cache = cache
        self.graphs = None
        self.cuda_graph_bytes = 0
        if device.type == "cuda" and config.use_cuda_graph:
            max_len = min(config.session_len or spec.max_position_embeddings, spec.max_position_embeddings)
            max_blocks = (max_len + self.block_size - 1) // self.block_size
            self.graphs = CudaGraphDecoder(model, config.max_batch_size, max_blocks, device)
            reserved = torch.cuda.memory_reserved(device)
            self.graphs.capture()
            self.cuda_graph_bytes = torch.cuda.memory_reserved(device) - reserved  # the graphs' pool (+ warm-up)

    # ---- KV cache -------------------------------------------------------------------------------------
    def _plan_num_blocks(self) -> int:
        if self.config.num_gpu_blocks is not None:
            return self.config.num_gpu_blocks
        block_bytes = self.kv_bytes_per_token * self.block_size
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = max(0, free - self.vision_reserved_bytes) * self.config.cache_max_entry_count
        else:
            budget = self.config.cpu_kv_cache_bytes * self.config.cache_max_entry_count
        num_blocks = comm.min_across_ranks(int(budget // block_bytes))
        if num_blocks < 1:
            raise MemoryError(
                f"no room for the KV cache: one block of {self.block_size} tokens needs {block_bytes / 2**20:.1f} MiB "
                f"and the budget is {budget / 2**20:.1f} MiB; raise cache_max_entry_count or use a smaller model"
            )
        return num_blocks

    @torch.inference_mode()
    def _measure_vision_activations(self) -> int:
        """Peak bytes the vision tower + projector allocate for the most tiles one step can encode."""
        clip = self.spec.vision.clip
        pixels = torch.zeros((self.max_vision_tiles, clip.num_channels, clip.image_size, clip.image_size),
                             dtype=self.dtype, device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.model.multi_modal_projector(self.model.vision_tower(pixels))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del pixels
        torch.cuda.empty_cache()
        return int(peak)

    def _allocate_kv_cache(self, num_blocks: int) -> list[KVCache]:
        spec, qp = self.spec, self.config.quant_policy
        head_dim = spec.head_dim if qp != 4 else spec.head_dim // 2
        shape = (num_blocks, self.block_size, spec.num_kv_heads, head_dim)
        caches = []
        for _ in range(spec.num_layers):
            if qp == 0:
                caches.append(KVCache(self._cache_tensor(shape, dtype=self.dtype, device=self.device),
                                      self._cache_tensor(shape, dtype=self.dtype, device=self.device)))
            else:
                sz_shape = (num_blocks, spec.num_kv_heads, KV_GROUPS[qp], self.block_size, 2)  # (scale, min)
                sz = scale_zero_dtype(self.dtype)
                v_storage = (num_blocks, spec.num_kv_heads, head_dim, self.block_size)  # token-minor V
                caches.append(KVCache(
                    self._cache_tensor(shape, dtype=torch.uint8, device=self.device),
                    self._cache_tensor(v_storage, dtype=torch.uint8, device=self.device).permute(0, 3, 1, 2),
                    self._cache_tensor(sz_shape, dtype=sz, device=self.device),
                    self._cache_tensor(sz_shape, dtype=sz, device=self.device),
                    qp,
                ))
        return caches

    def _cache_tensor(self, shape, dtype, device) -> torch.Tensor:
        # zeros on GPU: kernels may multiply masked-out lanes by 0, and NaN garbage would survive that;
        # empty on CPU: pages are then only committed as blocks are used
        return torch.zeros(shape, dtype=dtype, device=device) if device.type == "cuda" else torch.empty(
            shape, dtype=dtype, device=device)

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.kv_bytes_per_token

    # ---- one step -------------------------------------------------------------------------------------
    def _tensor(self, data, dtype) -> torch.Tensor:
        # pinned staging: a copy from pageable memory would make the host wait for the GPU's queued work,
        # which would undo the overlap of host scheduling with the running step
        pinned = self.device.type == "cuda"
        return torch.tensor(data, dtype=dtype, pin_memory=pinned).to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch):
        """Host lists -> device tensors: input ids, positions, metadata, and which rows get logits."""
        if not batch.is_prefill:
            return self._prepare_decode(batch.seqs)
        input_ids, positions, slots, kv_lens, cu_seqlens, sample_rows = [], [], [], [], [0], []
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(seq.block_table[pos // bs] * bs + pos % bs)
            kv_lens.append(start + n)
            cu_seqlens.append(cu_seqlens[-1] + n)
            if start + n == len(seq):
                sample_rows.append(cu_seqlens[-1] - 1)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        block_tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]
        meta = AttentionMetadata(
            is_prefill=batch.is_prefill,
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(block_tables, torch.int32),
            kv_lens=self._tensor(kv_lens, torch.int32),
            cu_seqlens_q=self._tensor(cu_seqlens, torch.int32) if batch.is_prefill else None,
            max_seqlen_q=max(batch.num_new_tokens),
        )
        if self.mrope:
            pos = self._mrope_positions(batch.seqs, [s.num_computed_tokens for s in batch.seqs], batch.num_new_tokens)
        else:
            pos = self._tensor(positions, torch.int64)
        return self._tensor(input_ids, torch.int64), pos, meta, sample_rows

    def _mrope_positions(self, seqs: list[Sequence], starts: list[int], counts: list[int]) -> torch.Tensor:
        """[3, num_tokens] M-RoPE positions of the tokens [start, start + count) of each sequence."""
        rows = torch.cat([self.model.mrope_positions(s.mm_items, a, a + n) for s, a, n in zip(seqs, starts, counts)],
                         dim=1)
        if self.device.type == "cuda":  # pinned, as _tensor: a pageable copy would wait for the queued step
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def _mrope_delta(self, seq: Sequence) -> int:
        """M-RoPE: a decoded token's position is its index + this per-sequence shift (0 without images)."""
        if seq.mrope_delta is None:
            seq.mrope_delta = self.model.mrope_delta(seq.mm_items)
        return seq.mrope_delta

    def _prepare_decode(self, seqs: list[Sequence]):
        """One token per sequence: its last. Everything goes to the device in one copy."""
        bs = self.block_size
        n = len(seqs)
        max_blocks = max(len(s.block_table) for s in seqs)
        flat = []
        for s in seqs:
            pos = len(s.token_ids) - 1
            rope_pos = pos + self._mrope_delta(s) if self.mrope else pos
            flat += (s.token_ids[-1], rope_pos, s.block_table[pos // bs] * bs + pos % bs, pos + 1)
        for s in seqs:
            flat += s.block_table
            flat += [0] * (max_blocks - len(s.block_table))
        host = torch.tensor(flat, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        dev = host.to(self.device, non_blocking=True)
        head = dev[: 4 * n].view(n, 4)
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=head[:, 2].contiguous(),
            block_tables=dev[4 * n :].view(n, max_blocks).to(torch.int32),
            kv_lens=head[:, 3].to(torch.int32),
            max_seqlen_q=1,
        )
        positions = head[:, 1]
        if self.mrope and any(s.mm_items and s.mm_items[-1].end >= len(s) for s in seqs):  # an image token is fed
            positions = self._mrope_positions(seqs, [len(s) - 1 for s in seqs], [1] * n)
        return head[:, 0], positions, meta, list(range(n))

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        gcs = [s.sampling.gen_config for s in seqs]
        temps = [0.0 if g.is_greedy else g.temperature for g in gcs]
        # min_new_tokens: the ids that would end a sequence (EOS unless ignore_eos, stop ids) are forbidden until then
        banned = [
            sorted(s.sampling.eos_token_ids | set(s.sampling.gen_config.stop_token_ids))
            if s.num_generated_tokens < s.sampling.gen_config.min_new_tokens else []
            for s in seqs
        ]
        if not any(temps) and all(g.needs_only_logits for g in gcs) and not any(banned):
            return SamplingBatch(*([None] * 6), all_greedy=True)  # argmax only: no per-row tensors needed
        f32, i64 = torch.float32, torch.int64
        b = SamplingBatch(
            temperatures=self._tensor(temps, f32),
            top_ks=self._tensor([g.top_k for g in gcs], i64),
            top_ps=self._tensor([g.top_p for g in gcs], f32),
            min_ps=self._tensor([g.min_p for g in gcs], f32),
            seeds=self._tensor([s.sampling.seed for s in seqs], i64),
            steps=self._tensor([s.num_generated_tokens for s in seqs], i64),
            all_greedy=all(t == 0.0 for t in temps),
            any_top_k_top_p=any(g.top_k > 0 or g.top_p < 1.0 for g in gcs),
            any_min_p=any(g.min_p > 0 for g in gcs),
        )
        if any(g.repetition_penalty != 1.0 for g in gcs):
            b.repetition_penalties = self._tensor([g.repetition_penalty for g in gcs], f32)
            b.seen_ids = self._padded([s.token_ids for s in seqs])
        if any(g.presence_penalty or g.frequency_penalty for g in gcs):
            b.presence_penalties = self._tensor([g.presence_penalty for g in gcs], f32)
            b.frequency_penalties = self._tensor([g.frequency_penalty for g in gcs], f32)
            b.generated_ids = self._padded([s.generated_token_ids for s in seqs])
        if any(banned):
            b.banned_ids = self._padded(banned)
        wanted = [g.logprobs for g in gcs if g.logprobs is not None]
        b.num_logprobs = max(wanted) if wanted else -1
        return b

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        return self._tensor([r + [-1] * (width - len(r)) for r in rows], torch.int64)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: StepHandle | None = None) -> StepHandle:
        """Queue forward + sampling on the device and return at once (on CUDA the host does not wait).

        Sequences whose last token is still PENDING (sampled by `prev`, not yet read back) take their input
        id straight from prev's device tensor, so step N+1 can run before step N's tokens reach the host."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        if prev is not None and not batch.is_prefill:
            rows = [s.pending_row if s.token_ids[-1] == PENDING else -1 for s in batch.seqs]
            if any(r >= 0 for r in rows):
                src = self._tensor(rows, torch.int64)
                input_ids = torch.where(src >= 0, prev.tokens[src.clamp_min(0)], input_ids)
        sampled_seqs = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == len(s)]
        embeds = self._image_embeds(batch, input_ids)  # vision tower + projector on the images this step covers

        def forward():  # the logits, or None when nothing samples
            if self.tp_group is not None:  # TP hook: the step's inputs to every worker, once, as tensors
                self.tp_group.broadcast_step(input_ids, positions, meta, sample_rows if sampled_seqs else [])
            if not batch.is_prefill and embeds is None and self.graphs is not None and self.graphs.can_run(
                    len(batch.seqs), meta.block_tables.shape[1]):
                return self.graphs.run(input_ids, positions, meta)
            hidden = self.model(input_ids, positions, meta, embeds)
            if not sampled_seqs:
                return None
            rows = hidden[self._tensor(sample_rows, torch.int64)] if batch.is_prefill else hidden
            return self.model.compute_logits(rows)

        # TP hook: a failure between the broadcast and the logits leaves the ranks out of step: fatal, naming ranks
        logits = forward() if self.tp_group is None else self.tp_group.run_step(forward)
        if logits is None:
            return StepHandle(batch, [], None, None, None, None)
        tokens, logprob_info = sample(logits, self.sampling_batch(sampled_seqs))
        host, event = None, None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return StepHandle(batch, sampled_seqs, tokens, host, event, logprob_info)

    def _image_embeds(self, batch: ScheduledBatch, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Input embeddings with image features written over placeholders, for a step that covers any; else None.
        (A decode step can too: a chunked prefill that stops one token short of a prompt ending in an image.)"""
        if self.encoder_cache is None or not any(s.mm_items for s in batch.seqs):
            return None
        if batch.is_prefill:
            starts = [s.num_computed_tokens for s in batch.seqs]
        else:
            starts = [len(s) - 1 for s in batch.seqs]
        return image_embeddings(self.model, self.encoder_cache, batch.seqs, starts, batch.num_new_tokens, input_ids)

    def resolve(self, handle: StepHandle) -> list[int]:
        """Wait for a launched step's sampled tokens and return them as host ints."""
        if handle.tokens is None:
            return []
        if handle.event is not None:
            handle.event.synchronize()
            return handle.host.tolist()
        return handle.tokens.tolist()

    @torch.inference_mode()
    def prompt_logits(self, seq: Sequence, num_tokens: int | None = None) -> torch.Tensor:
        """Logits at the next `num_tokens` positions (default: all left) of a sequence whose blocks are allocated,
        from its num_computed_tokens on; the KV of those positions is written, as a prefill chunk would."""
        n = len(seq) - seq.num_computed_tokens if num_tokens is None else num_tokens
        batch = ScheduledBatch([seq], [n], True)
        input_ids, positions, meta, _ = self.prepare(batch)
        embeds = self._image_embeds(batch, input_ids)

        def forward():
            if self.tp_group is not None:  # TP hook
                self.tp_group.broadcast_step(input_ids, positions, meta, list(range(input_ids.shape[0])))
            return self.model.compute_logits(self.model(input_ids, positions, meta, embeds))

        return forward() if self.tp_group is None else self.tp_group.run_step(forward)
