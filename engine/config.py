"""Engine and generation settings: two dataclasses, validated when built.

Names follow LMDeploy's TurbomindEngineConfig / GenerationConfig where one exists, so commands and
scripts written for it read naturally here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import BadInputError

VALID_QUANT_POLICIES = (0, 4, 8)
VALID_MODEL_FORMATS = ("auto", "hf", "awq")
VALID_DTYPES = ("auto", "float16", "bfloat16", "float32")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # per-request numbers become int64 tensors: nothing past these
MAX_LOGPROBS = 20
_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_int(name: str, value, lo: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"{name} must be an integer, got {_short(value)}")
    if not lo <= value <= INT64_MAX:
        low = "-2**63" if lo == INT64_MIN else lo
        raise BadInputError(f"{name} must be in [{low}, 2**63 - 1], got {_short(value)}")


def _check_float(name: str, value) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53:
        return
    if not isinstance(value, float) or not math.isfinite(value):
        raise BadInputError(f"{name} must be a finite number, got {_short(value)}")


@dataclass
class EngineConfig:
    model_format: str = "auto"  # auto: read quantization_config from config.json
    dtype: str = "auto"  # auto: the checkpoint's dtype on GPU, float32 on CPU (CPU half matmuls are slow)
    quant_policy: int = 0  # KV cache: 0 model dtype, 8 int8, 4 int4 (Hadamard-rotated, asymmetric; reference.py)
    cache_max_entry_count: float = 0.8  # fraction of memory free after weights load given to the KV cache
    cache_block_seq_len: int = 64  # tokens per KV block
    session_len: int | None = None  # max prompt + generated tokens per request; None: model's max positions
    max_batch_size: int = 128  # running sequences per decode step
    max_prefill_token_num: int = 8192  # tokens per prefill step; longer prompts are prefilled in chunks
    enable_prefix_caching: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu
    cpu_kv_cache_bytes: int = 512 * 1024**2  # on CPU there is no "free memory": the budget the fraction applies to
    num_gpu_blocks: int | None = None  # overrides the computed KV block count (tests, capacity planning)
    use_cuda_graph: bool = True  # decode steps replay captured graphs on GPU
    overlap_scheduling: bool | None = None  # launch step N+1 before reading step N's tokens; None: on for CUDA
    load_format: str = "auto"  # dummy: random weights from config.json alone (benchmarks at real shapes)
    trust_remote_code: bool = False  # run a folder's own tokenizer code (InternLM2 ships one)
    tp: int = 1  # tensor parallelism: ranks (GPUs, or gloo processes on CPU); engine/parallel
    seed: int = 0  # seeds the per-request seeds of requests that give none
    # vision-language models (LLaVA); text-only models ignore these
    vision_tower: str | None = None  # the CLIP checkpoint (folder or hub id) of an original-layout LLaVA's tower
    encoder_cache_bytes: int = 256 * 2**20  # projected image features kept (LRU) so later turns skip the tower
    allow_media_urls: bool = False  # fetch http(s) image URLs named in chat messages (the server makes the GET)
    allowed_local_media_path: str | None = None  # chat-message image paths must lie inside it; None: refused
    limit_images_per_prompt: int = 4
    max_image_bytes: int = 20 * 2**20  # encoded bytes of one image
    max_image_pixels: int = 40_000_000  # width * height of one image
    image_memo_bytes: int = 32 * 2**20  # preprocessed images kept by content hash (on the GPU when it preprocesses)
    image_workers: int = 2  # threads that decode and preprocess images, off the event loop (each holds one decode)
    max_images_in_flight: int = 32  # images queued or being prepared; beyond: ImagesBusyError (HTTP 429)
    max_image_bytes_in_flight: int = 256 * 2**20  # their encoded bytes (upper bounds); beyond: ImagesBusyError

    def __post_init__(self):
        if self.model_format not in VALID_MODEL_FORMATS:
            raise ValueError(f"model_format must be one of {VALID_MODEL_FORMATS}, got {self.model_format!r}")
        if self.dtype not in VALID_DTYPES:
            raise ValueError(f"dtype must be one of {VALID_DTYPES}, got {self.dtype!r}")
        if self.quant_policy not in VALID_QUANT_POLICIES:
            raise ValueError(f"quant_policy must be 0 (off), 8 (int8 KV) or 4 (int4 KV), got {self.quant_policy!r}")
        if not 0.0 < self.cache_max_entry_count <= 1.0:
            raise ValueError(f"cache_max_entry_count must be in (0, 1], got {self.cache_max_entry_count}")
        if self.cache_block_seq_len < 1 or self.cache_block_seq_len & (self.cache_block_seq_len - 1):
            raise ValueError(f"cache_block_seq_len must be a power of two, got {self.cache_block_seq_len}")
        if self.session_len is not None and self.session_len < 2:
            raise ValueError(f"session_len must be at least 2, got {self.session_len}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_prefill_token_num < self.cache_block_seq_len:
            raise ValueError(
                f"max_prefill_token_num ({self.max_prefill_token_num}) must be at least one block "
                f"({self.cache_block_seq_len} tokens)"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if not isinstance(self.tp, int) or not 1 <= self.tp <= 64:
            raise ValueError(f"tp must be an integer in [1, 64], got {self.tp!r}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be positive, got {self.num_gpu_blocks}")
        if isinstance(self.image_workers, bool) or not isinstance(self.image_workers, int) or self.image_workers < 1:
            raise ValueError(f"image_workers must be a positive integer, got {self.image_workers!r}")
        for name in ("encoder_cache_bytes", "limit_images_per_prompt", "max_image_bytes", "max_image_pixels",
                     "image_memo_bytes", "max_images_in_flight", "max_image_bytes_in_flight"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(
                    self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    do_sample: bool = False  # False: greedy, whatever the temperature
    temperature: float = 1.0  # 0 also means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics: divides positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed, same prompt, same settings: same output
    stop_words: list[str] = field(default_factory=list)  # stop strings; not included in the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: none; k >= 0: chosen token's logprob plus the top k

    def __post_init__(self):
        """Every value is checked for type and range here, so nothing a caller sends can overflow a tensor or index
        past the vocabulary later; what depends on the model (token ids vs. the vocabulary) is `check_for_model`."""
        for name in _INT_FIELDS:
            _check_int(name, getattr(self, name))
        for name in _FLOAT_FIELDS:
            _check_float(name, getattr(self, name))
        for name in ("do_sample", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise BadInputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise BadInputError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0:
            raise BadInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BadInputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise BadInputError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise BadInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise BadInputError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.seed is not None:
            _check_int("seed", self.seed, INT64_MIN)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise BadInputError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if isinstance(self.stop_words, str):
            self.stop_words = [self.stop_words]
        if not isinstance(self.stop_words, list | tuple) or not all(isinstance(s, str) for s in self.stop_words):
            raise BadInputError("stop_words must be a list of strings")
        if any(not s for s in self.stop_words):
            raise BadInputError("stop strings must not be empty")
        self.stop_words = list(self.stop_words)
        if not isinstance(self.stop_token_ids, list | tuple):
            raise BadInputError("stop_token_ids must be a list of token ids")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id)
        self.stop_token_ids = list(self.stop_token_ids)

    def check_for_model(self, vocab_size: int) -> None:
        """Refuse what the model cannot take: token ids outside its vocabulary (a sampler index past the logits'
        width fails the whole step, and on CUDA poisons the device for the process)."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise BadInputError(f"stop_token_ids must be in [0, {vocab_size}) for this model, got {bad[:4]}")

    @property
    def needs_only_logits(self) -> bool:
        """No penalties and no logprobs: sampling needs nothing but this step's logits, so it takes the fast
        path and the step may run before the host has read the previous step's tokens."""
        return (self.repetition_penalty == 1.0 and not self.presence_penalty and not self.frequency_penalty
                and self.logprobs is None)

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0
