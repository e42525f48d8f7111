"""Quality on real text, computed by the engine itself: perplexity from prompt scoring (`LLMEngine.score`), and
greedy agreement between two pipelines.

    from studio.quality import perplexity, heldout_text
    perplexity(pipe, heldout_text()).ppl
    heldout_perplexity(pipe).ppl   # the quick check that the Quantize tab and the Compare runner both report

The text is tokenized once and cut into windows of at most `window` tokens (default: 1024, or session_len if
smaller) scored independently, as the AWQ paper's wikitext-2 figures are (there with 2048-token windows); each
window's first token only conditions. Perplexity = exp(mean negative log-likelihood of the scored tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

from engine.config import EngineConfig
from engine.pipeline import pipeline

DEFAULT_WINDOW = 1024
HELDOUT_NAME = "studio/data/heldout.txt"
HELDOUT_DESCRIPTION = (
    "built-in held-out prose (studio/data/heldout.txt: lighthouses, bread, rivers, a short story, sleep; "
    "written for this project, not in any calibration set)"
)


def heldout_text(max_chars: int | None = None) -> str:
    """The built-in held-out text (plain English prose, unlike the built-in calibration set's technical docs),
    cut at a paragraph boundary within `max_chars` when given."""
    text = resources.files("studio").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    num_tokens: int  # tokens scored
    num_windows: int
    window: int

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "num_tokens": self.num_tokens, "num_windows": self.num_windows,
                "window": self.window}


def perplexity(pipe, text: str, window: int | None = None, progress=None) -> Perplexity:
    """Perplexity of `text` under `pipe`'s engine (its weights format and KV-cache policy). `progress(done, total)`
    is called after each window."""
    ids = pipe.tokenizer.encode(text, add_special_tokens=True)
    if len(ids) < 2:
        raise ValueError("the text is too short to measure perplexity: it needs at least 2 tokens")
    window = min(window or DEFAULT_WINDOW, pipe.session_len)
    if window < 2:
        raise ValueError(f"the scoring window must hold at least 2 tokens, got {window}")
    starts = [s for s in range(0, len(ids), window) if len(ids) - s >= 2]
    total_nll, scored = 0.0, 0
    for i, start in enumerate(starts):
        entries = pipe.engine.score(ids[start : start + window])
        for entry in entries[1:]:
            total_nll -= entry["logprob"]
            scored += 1
        if progress is not None:
            progress(i + 1, len(starts))
    nll = total_nll / scored
    return Perplexity(math.exp(nll), nll, scored, len(starts), window)


def top1_agreement(a: list[dict], b: list[dict]) -> float:
    """Teacher-forced agreement of two scorings of the same text (`score(..., top_logprobs=1)`): the fraction of
    positions where both would pick the same next token. Unlike free-running greedy agreement it does not hinge on
    the first flip, so it measures how often a quantized setting changes the model's choice."""
    pairs = [(x["top"][0][0], y["top"][0][0]) for x, y in zip(a[1:], b[1:]) if x["top"] and y["top"]]
    if not pairs:
        raise ValueError("top1_agreement needs scorings made with top_logprobs >= 1")
    return sum(x == y for x, y in pairs) / len(pairs)


def greedy_agreement(a: list[int], b: list[int]) -> float:
    """The fraction of leading tokens two greedy continuations share (1.0: identical over the shorter one)."""
    n = min(len(a), len(b))
    if n == 0:
        return 1.0 if len(a) == len(b) else 0.0
    same = next((i for i in range(n) if a[i] != b[i]), n)
    return same / n


QUICK_CHECK_CHARS = 2500  # about 550 tokens of the held-out text: a before/after check of a few seconds per model


def heldout_perplexity(pipe, text: str | None = None, window: int = DEFAULT_WINDOW) -> Perplexity:
    """The one perplexity figure the product shows (Quantize's before/after, every Compare row): `text` (default:
    the first QUICK_CHECK_CHARS of the held-out text) scored in windows of `window` tokens, capped by the session
    length and by what the KV cache holds."""
    text = text if text is not None else heldout_text(QUICK_CHECK_CHARS)
    return perplexity(pipe, text, window=max(2, min(window, pipe.engine.capacity_tokens - 1)))


def quantization_check(source: str, quantized: str, progress=None, cancelled=None,
                       text: str | None = None, window: int = 1024) -> dict:
    """Perplexity of the 16-bit source model and of its quantized folder on the same held-out text, each loaded
    alone in a small engine (a KV cache just big enough for one window) and closed before the next.

    progress(done, total, message) after each model; cancelled() -> True stops before the next model (the result
    then says so). Returns {"before", "after", "num_tokens", "text", "cancelled"}."""
    description = HELDOUT_DESCRIPTION if text is None else "given text"
    text = text if text is not None else heldout_text(QUICK_CHECK_CHARS)
    result = {"before": None, "after": None, "num_tokens": 0, "cancelled": False, "text": description}
    block = 64
    config = EngineConfig(session_len=window + 1, cache_block_seq_len=block, num_gpu_blocks=window // block + 2,
                          max_batch_size=1, use_cuda_graph=False)
    for i, (key, folder, label) in enumerate((("before", source, "the 16-bit model"),
                                              ("after", quantized, "the quantized model"))):
        if cancelled is not None and cancelled():
            result["cancelled"] = True
            break
        if progress is not None:
            progress(i, 2, f"perplexity of {label}")
        with pipeline(folder, config) as pipe:
            ppl = heldout_perplexity(pipe, text, window=window)
        result[key], result["num_tokens"] = ppl.ppl, ppl.num_tokens
    if progress is not None:
        progress(2, 2, "perplexity measured")
    return result
