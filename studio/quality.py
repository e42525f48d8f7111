"""Quality on real text, computed by the engine itself (`LLMEngine.score`, the one scoring path): perplexity, the
KL divergence of the next-token distribution against the 16-bit model (mean and 99th percentile over positions),
and top-1 agreement, on several built-in held-out texts reported one by one.

    from studio.quality import heldout_texts, score_text, divergence, quality_report
    ref = {name: score_text(pipe16, text) for name, text in heldout_texts().items()}
    report = quality_report(pipe_quant, reference=ref)   # {"prose": {"ppl", "kld_mean", "kld_p99", "top1"}, ...,
                                                          #  "all": pooled over every text}
    perplexity(pipe, heldout_text()).ppl                  # a whole text in windows (benchmarks, tests)

Held-out texts (studio/data/, written for this project, never in any calibration set: the built-in one is Python's
licence, pydoc topics and standard-library docstrings): English prose, a Python module with docstrings, a multi-turn
chat transcript in ChatML, Chinese prose (meaningful only for models that speak it).

The quick check (Quantize's before/after, every Compare row) scores the first QUICK_CHECK_TOKENS tokens of each
text as one window with the top TOP_K log-probabilities per position. KL divergence from top-k logprobs (the
engine returns at most 20 per position): KL(P16 || Q) over the reference's top-k tokens plus one bucket for the
rest of the vocabulary. Q's logprob at a reference top-k token missing from Q's own top-k is taken as Q's k-th
logprob (an upper bound on it), and Q's rest bucket is 1 minus Q's mass on the reference's tokens. Merging the tail
into one bucket can only lower KL (data processing), so the figure leans low; it is exact when the tail mass is
negligible and 0 for a model against itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import torch

from engine.config import EngineConfig
from engine.pipeline import pipeline

DEFAULT_WINDOW = 1024
QUICK_CHECK_TOKENS = 512  # per text: a before/after check of a few seconds per model on a small model
TOP_K = 20  # logprobs kept per position for the KL divergence (the engine's MAX_LOGPROBS)
HELDOUT_TEXTS = {  # name: (file in studio/data, what it is)
    "prose": ("heldout.txt", "English prose (lighthouses, bread, rivers, a short story, sleep)"),
    "code": ("heldout_code.txt", "a Python module with docstrings (tide tables)"),
    "chat": ("heldout_chat.txt", "a multi-turn chat transcript in ChatML (a community garden)"),
    "chinese": ("heldout_zh.txt", "Chinese prose (an old watch-repair shop)"),
}
HELDOUT_NAME = "studio/data/heldout.txt"
HELDOUT_DESCRIPTION = (
    f"the first {QUICK_CHECK_TOKENS} tokens of each built-in held-out text (studio/data: prose, code, chat, "
    "Chinese; written for this project, not in any calibration set)"
)


def heldout_text(max_chars: int | None = None, name: str = "prose") -> str:
    """A built-in held-out text (default: the English prose), cut at a paragraph boundary within `max_chars`."""
    if name not in HELDOUT_TEXTS:
        raise ValueError(f"unknown held-out text {name!r}: one of {', '.join(HELDOUT_TEXTS)}")
    text = resources.files("studio").joinpath("data", HELDOUT_TEXTS[name][0]).read_text(encoding="utf-8")
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def heldout_texts() -> dict[str, str]:
    """Every built-in held-out text by name (prose, code, chat, chinese)."""
    return {name: heldout_text(name=name) for name in HELDOUT_TEXTS}


# ---- perplexity over a whole text ------------------------------------------------------------------------------
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
    """Perplexity of all of `text` under `pipe`'s engine (its weights format and KV-cache policy), in windows of at
    most `window` tokens (default 1024, or session_len if smaller) scored independently; each window's first token
    only conditions. `progress(done, total)` is called after each window."""
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


# ---- the quick check: one window per text, top-k per position ------------------------------------------------------
@dataclass
class Scoring:
    """One text scored by one engine: per scored position, the text token's logprob and the top-k (ids, logprobs),
    a few tens of KB per text (kept in memory, or saved by Compare for the settings that follow)."""

    logprobs: torch.Tensor  # float64 [n]: the text's next token at each position
    top_ids: torch.Tensor  # int32 [n, k]
    top_logprobs: torch.Tensor  # float32 [n, k]

    @property
    def num_tokens(self) -> int:
        return int(self.logprobs.numel())

    @property
    def nll(self) -> float:
        return float(-self.logprobs.mean())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict:
        return {"logprobs": self.logprobs, "top_ids": self.top_ids, "top_logprobs": self.top_logprobs}

    @classmethod
    def from_dict(cls, d: dict) -> Scoring:
        return cls(d["logprobs"], d["top_ids"], d["top_logprobs"])


def quick_window(pipe, max_tokens: int = QUICK_CHECK_TOKENS) -> int:
    """Tokens scored per text: max_tokens, capped by the session length and what the KV cache holds."""
    return max(2, min(max_tokens, pipe.session_len, pipe.engine.capacity_tokens - 1))


def score_text(pipe, text: str, max_tokens: int = QUICK_CHECK_TOKENS, top_k: int = TOP_K) -> Scoring:
    """The first `max_tokens` tokens of `text` (capped as quick_window says) scored as one window."""
    ids = pipe.tokenizer.encode(text, add_special_tokens=True)[: quick_window(pipe, max_tokens)]
    if len(ids) < 2:
        raise ValueError("the text is too short to score: it needs at least 2 tokens")
    entries = pipe.engine.score(ids, top_k)[1:]
    return Scoring(torch.tensor([e["logprob"] for e in entries], dtype=torch.float64),
                   torch.tensor([[i for i, _ in e["top"]] for e in entries], dtype=torch.int32),
                   torch.tensor([[lp for _, lp in e["top"]] for e in entries], dtype=torch.float32))


def kl_from_top_k(ref_ids: torch.Tensor, ref_lp: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(P || Q) from both runs' top-k [n, k] (the approximation the module docstring states)."""
    ref_lp, lp = ref_lp.double(), lp.double()
    same = ref_ids[:, :, None] == ids[:, None, :]  # [n, k_ref, k]
    found = same.any(-1)
    q_lp = torch.where(same, lp[:, None, :], torch.full_like(same, -math.inf, dtype=lp.dtype)).amax(-1)
    q_lp = torch.where(found, q_lp, lp[:, -1:].expand_as(q_lp))
    p, q = ref_lp.exp(), q_lp.exp()
    kl = (p * (ref_lp - q_lp)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest = (1 - q.sum(-1)).clamp(min=1e-12)
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-300).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (kl + tail).clamp(min=0)


def divergence(reference: Scoring, other: Scoring) -> dict:
    """KL divergence mean / p99 and top-1 agreement of `other` against `reference` over their common positions (the
    same text from its first token, so a shorter window is a prefix of a longer one)."""
    n = min(reference.num_tokens, other.num_tokens)
    if n == 0:
        raise ValueError("no common positions to compare")
    kl = kl_from_top_k(reference.top_ids[:n], reference.top_logprobs[:n], other.top_ids[:n], other.top_logprobs[:n])
    top1 = (reference.top_ids[:n, 0] == other.top_ids[:n, 0]).double().mean()
    return {"kld_mean": float(kl.mean()), "kld_p99": float(torch.quantile(kl, 0.99)), "top1": float(top1),
            "kld_positions": n, "_kl": kl, "_top1": reference.top_ids[:n, 0] == other.top_ids[:n, 0]}


def score_texts(pipe, texts: dict[str, str] | None = None, max_tokens: int = QUICK_CHECK_TOKENS,
                progress=None) -> dict[str, Scoring]:
    """score_text for each text (default: every built-in held-out text); progress(done, total) after each."""
    texts = texts if texts is not None else heldout_texts()
    out = {}
    for i, (name, text) in enumerate(texts.items()):
        out[name] = score_text(pipe, text, max_tokens)
        if progress is not None:
            progress(i + 1, len(texts))
    return out


def quality_figures(scorings: dict[str, Scoring], reference: dict[str, Scoring] | None = None) -> dict:
    """{text name: {"ppl", "nll", "num_tokens", and against `reference`: "kld_mean", "kld_p99", "top1"}, "all":
    KL mean / p99 and top-1 pooled over every position of every text}. JSON-ready."""
    report, kls, tops = {}, [], []
    for name, s in scorings.items():
        row = {"ppl": s.ppl, "nll": s.nll, "num_tokens": s.num_tokens}
        if reference is not None and name in reference:
            d = divergence(reference[name], s)
            kls.append(d.pop("_kl"))
            tops.append(d.pop("_top1"))
            row.update(d)
        report[name] = row
    if kls:
        kl, top = torch.cat(kls), torch.cat(tops)
        report["all"] = {"kld_mean": float(kl.mean()), "kld_p99": float(torch.quantile(kl, 0.99)),
                         "top1": float(top.double().mean()), "kld_positions": int(kl.numel())}
    return report


def quality_report(pipe, reference: dict[str, Scoring] | None = None, texts: dict[str, str] | None = None) -> dict:
    """Score every held-out text under `pipe` and compare against `reference` (the 16-bit model's scorings)."""
    return quality_figures(score_texts(pipe, texts), reference)


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


def summary_figures(before: dict, after: dict) -> dict:
    """The headline of a quality report pair: prose perplexity before / after, and the pooled KL / top-1."""
    return {"ppl_before": before["prose"]["ppl"], "ppl_after": after["prose"]["ppl"],
            **{k: after.get("all", {}).get(k) for k in ("kld_mean", "kld_p99", "top1")}}


def quantization_check(source: str, quantized: str, progress=None, cancelled=None,
                       texts: dict[str, str] | None = None, max_tokens: int = QUICK_CHECK_TOKENS) -> dict:
    """Quality of the 16-bit source model and of its quantized folder on the held-out texts, each loaded alone in a
    small engine (a KV cache just big enough for one window) and closed before the next; the quantized model is
    compared against the 16-bit one's scorings (kept in memory: a few tens of KB per text).

    progress(done, total, message) after each model; cancelled() -> True stops before the next model (the result
    then says so). Returns {"before", "after" (prose perplexity), "num_tokens" (prose tokens scored), "texts":
    {name: {"before": figures, "after": figures}}, "summary": {"kld_mean", "kld_p99", "top1"} pooled over texts,
    "text", "cancelled"}."""
    description = HELDOUT_DESCRIPTION if texts is None else "given texts"
    texts = texts if texts is not None else heldout_texts()
    result = {"before": None, "after": None, "num_tokens": 0, "cancelled": False, "text": description,
              "texts": {}, "summary": None}
    block = 64
    config = EngineConfig(session_len=max_tokens + 1, cache_block_seq_len=block,
                          num_gpu_blocks=max_tokens // block + 2, max_batch_size=1, use_cuda_graph=False)
    reference = None
    for i, (key, folder, label) in enumerate((("before", source, "the 16-bit model"),
                                              ("after", quantized, "the quantized model"))):
        if cancelled is not None and cancelled():
            result["cancelled"] = True
            break
        if progress is not None:
            progress(i, 2, f"quality of {label}")
        with pipeline(folder, config) as pipe:
            scorings = score_texts(pipe, texts, max_tokens)
        reference = reference or scorings
        figures = quality_figures(scorings, reference)
        for name, row in figures.items():
            if name != "all":
                result["texts"].setdefault(name, {})[key] = row
        first = next(iter(scorings))
        main = "prose" if "prose" in scorings else first
        result[key], result["num_tokens"] = scorings[main].ppl, scorings[main].num_tokens
        if key == "after":
            result["summary"] = figures.get("all")
    if progress is not None:
        progress(2, 2, "quality measured")
    return result
