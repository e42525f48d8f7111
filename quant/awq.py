"""AWQ (Lin et al., "Activation-aware Weight Quantization", 2023) for W4A16, and the layer-by-layer driver.

Per decoder layer, with only that layer and its calibration activations on the device:
1. run the layer over all calibration samples (in chunks), capturing each scale group's input: the mean |x| per
   channel over every token, and the full inputs of the first `search_tokens` worth of samples; the layer's fp
   outputs become the next layer's inputs (as in AutoAWQ / llm-awq);
2. with `compare_rtn`, measure the round-to-nearest error of the untouched layer on the first `report_tokens`
   worth of samples (the baseline the layer's AWQ error is reported against);
3. per scale group (q/k/v after input_layernorm, o_proj after v_proj when v_proj's width equals o_proj's (MHA),
   gate/up after post_attention_layernorm, down_proj after up_proj), grid-search `n_grid` ratios of
   s = x_mean**ratio (normalised to sqrt(max * min) = 1), minimising the MSE of the group's module output
   (self_attn / mlp / the linear) under fake quantization of W * s; fold s into the previous norm or linear;
   with `search_scale` the grid also covers LMDeploy's weight-aware form s = x_mean**r / w_mean**(1 - r);
4. per linear (not q/k), search a max-abs clipping threshold per (row, group) over 512 sampled tokens;
5. quantize (asymmetric, group-wise, zero point), keep the fake-quantized weights in the in-memory model, and
   hand the integer tensors to `on_layer` (the exporter packs them).
`method="rtn"` skips 1-4: plain round-to-nearest, no calibration data. `quantized_inputs` (off by default; a lever
measured in benchmarks/awq_levers_real_model.py) feeds the next layer the quantized layer's outputs instead of step 1's.

Progress goes through one interface (`ProgressCallback.on_progress(stage, done, total, message)`), with a tqdm
adapter for the terminal; a `threading.Event` cancels between layers (and between a layer's steps) by raising
`QuantizationCancelled`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from quant.arch import ArchSpec, ScaleGroup, find_layers
from quant.errors import QuantizationCancelled
from quant.primitives import PACK_FACTOR, dequantize, fake_quantize, quantize, resolve_group_size

# ----------------------------------------------------------------------------- progress


@runtime_checkable
class ProgressCallback(Protocol):
    def on_progress(self, stage: str, done: int, total: int, message: str = "") -> None: ...


class NullProgress:
    def on_progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        pass


class FunctionProgress:
    """Adapts a plain `f(stage, done, total, message)` callable."""

    def __init__(self, fn: Callable[[str, int, int, str], None]):
        self.fn = fn

    def on_progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        self.fn(stage, done, total, message)


class TqdmProgress:
    """One tqdm bar per stage, on stderr; the message goes into the bar's postfix."""

    def __init__(self, **tqdm_kwargs):
        self.kwargs = {"dynamic_ncols": True, **tqdm_kwargs}
        self.bars: dict[str, object] = {}
        self.finished: set[str] = set()

    def on_progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(stage)
        if bar is None and done >= total and stage in self.finished:
            return
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, **self.kwargs)
        if bar.total != total:
            bar.total = total
        bar.n = done
        if message:
            bar.set_postfix_str(message, refresh=False)
        if done >= total:
            bar.close()  # draws the final state once
            del self.bars[stage]
            self.finished.add(stage)
        else:
            bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def as_progress(progress) -> ProgressCallback:
    if progress is None:
        return NullProgress()
    if isinstance(progress, ProgressCallback):
        return progress
    if callable(progress):
        return FunctionProgress(progress)
    raise TypeError(f"progress must have on_progress(stage, done, total, message) or be callable, got {progress!r}")


def check_cancel(cancel: threading.Event | Callable[[], bool] | None, where: str) -> None:
    if cancel is None:
        return
    is_set = cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())
    if is_set:
        raise QuantizationCancelled(f"quantization cancelled {where}")


# ----------------------------------------------------------------------------- settings and results


@dataclass
class AWQConfig:
    w_bits: int = 4
    w_group_size: int = 128  # -1: one group per row
    method: str = "awq"  # "awq" or "rtn" (round to nearest, for comparison)
    search_scale: bool = False  # also search LMDeploy's weight-aware scale form (twice the scale-search time)
    clip: bool = True  # AutoAWQ's max-abs clip search after the scale search
    n_grid: int = 20  # ratios tried by the scale search; the clip search tries max_shrink * n_grid thresholds
    max_shrink: float = 0.5  # the clip search shrinks max |w| down to (1 - max_shrink) of it
    clip_tokens: int = 512  # tokens the clip search evaluates (AutoAWQ's n_sample_token)
    search_tokens: int = 65536  # tokens (whole samples) the scale search uses; AutoAWQ's default 128 x 512
    chunk_tokens: int = 8192  # tokens per forward chunk: bounds activation memory (MLP intermediates)
    report_tokens: int = 16384  # tokens on which per-layer output errors (AWQ, RTN) are measured
    compare_rtn: bool = True  # also measure RTN's per-layer output error, for the report
    quantized_inputs: bool = False  # next layer's calibration inputs from this layer once quantized (GPTQ-style)
    # instead of its 16-bit outputs (AutoAWQ / llm-awq): each layer's search then sees, and can offset, the error
    # of the layers before it; costs one more pass over the samples per layer and a copy of the layer inputs

    def __post_init__(self):
        if self.method not in ("awq", "rtn"):
            raise ValueError(f"method must be 'awq' or 'rtn', got {self.method!r}")
        if self.w_group_size != -1 and self.w_group_size <= 0:
            raise ValueError(f"w_group_size must be positive or -1, got {self.w_group_size}")
        for name in ("n_grid", "clip_tokens", "search_tokens", "chunk_tokens", "report_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")


@dataclass
class QuantizedLinear:
    name: str  # module name in the (Llama-layout) model, e.g. "model.layers.0.self_attn.q_proj"
    q: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # fp16 [out, n_groups]
    zeros: torch.Tensor  # int32 [out, n_groups]
    bias: torch.Tensor | None


@dataclass
class LayerStats:
    index: int
    seconds: float = 0.0
    mse_awq: float | None = None  # layer output MSE vs fp, on the report tokens
    mse_rtn: float | None = None
    out_mean_square: float | None = None  # mean square of the fp output, to read the MSEs against
    scale_search: dict = field(default_factory=dict)  # prev module -> {"ratio", "form", "loss", "loss_rtn"}
    clip: dict = field(default_factory=dict)  # linear -> mean clip threshold / max |w|

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        if self.mse_awq is not None and self.mse_rtn:
            d["awq_over_rtn"] = self.mse_awq / self.mse_rtn
        return d


# ----------------------------------------------------------------------------- search kernels


def _forward_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over x's samples, `chunk` at a time, into one preallocated output (no list + cat double peak)."""
    out = None
    for i in range(0, x.shape[0], chunk):
        y = fn(x[i : i + chunk])
        if out is None:
            out = torch.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device)
        out[i : i + y.shape[0]].copy_(y)
    return out


def _chunked_sq_error(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, ref: torch.Tensor, chunk: int
) -> float:
    """sum((fn(x) - ref)^2) / ref.numel(), evaluated chunk by chunk (fn's outputs never all live at once)."""
    total = torch.zeros((), dtype=torch.float32, device=ref.device)
    for i in range(0, x.shape[0], chunk):
        total += (fn(x[i : i + chunk]).float() - ref[i : i + chunk].float()).pow(2).sum()
    return total.item() / ref.numel()


def weight_magnitude(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel mean of |w| / max |w| over its quantization group (LMDeploy's / AutoAWQ's w_mean)."""
    w = torch.cat([wi.float() for wi in weights], dim=0)  # [sum of outs, in]
    gs = resolve_group_size(group_size, w.shape[1])
    wg = w.abs().view(-1, gs)
    wg = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
    return wg.view(w.shape).mean(dim=0)  # [in]


def scale_candidates(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int
) -> list[tuple[float, str, torch.Tensor]]:
    """(ratio, form, s) for the grid: form "act" is x_mean**r; "act/weight" is x_mean**r / w_mean**(1-r)."""
    out = []
    forms = ["act"] + (["act/weight"] if w_mean is not None else [])
    for form in forms:
        for i in range(n_grid):
            r = i / n_grid
            s = x_mean.pow(r)
            if form == "act/weight":
                s = s / (w_mean.pow(1 - r) + 1e-4)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
            out.append((r, form, s))
    return out


@torch.no_grad()
def search_best_scale(
    inspect_fn: Callable[[torch.Tensor], torch.Tensor],
    linears: list[nn.Linear],
    x: torch.Tensor,
    x_mean: torch.Tensor,
    cfg: AWQConfig,
    chunk: int,
) -> tuple[torch.Tensor, dict]:
    """Grid-search the AWQ scale of linears sharing input x ([n, T, in]); returns s (fp32 [in]) and a summary.

    inspect_fn(x_chunk) is the module whose output is compared (self_attn, mlp, or the linear itself); the
    candidate weights are Q(W * s) / s, so the input is left as is and nothing has to be folded to try one.
    """
    ref = _forward_chunks(inspect_fn, x, chunk)  # [n, T, out]
    originals = [lin.weight.data for lin in linears]
    dtype = originals[0].dtype
    w_mean = weight_magnitude(originals, cfg.w_group_size) if cfg.search_scale else None
    best_loss, best = math.inf, None
    loss_rtn = None
    try:
        for ratio, form, s in scale_candidates(x_mean.float(), w_mean, cfg.n_grid):
            for lin, w0 in zip(linears, originals, strict=True):
                lin.weight.data = (fake_quantize(w0.float() * s, cfg.w_bits, cfg.w_group_size) / s).to(dtype)
            loss = _chunked_sq_error(inspect_fn, x, ref, chunk)
            if ratio == 0.0 and form == "act":
                loss_rtn = loss
            if loss < best_loss:
                best_loss, best = loss, (ratio, form, s)
    finally:
        for lin, w0 in zip(linears, originals, strict=True):
            lin.weight.data = w0
    if best is None:
        raise RuntimeError("scale search found no finite loss (NaN activations or weights?)")
    ratio, form, s = best
    return s, {"ratio": ratio, "form": form, "loss": best_loss, "loss_rtn": loss_rtn}


@torch.no_grad()
def search_best_clip(w: torch.Tensor, x: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """AutoAWQ's clip search: per (row, group) the max |w| threshold (fp32 [out, n_groups]) that minimises
    the group's partial output error on tokens x ([n_tok, in]), trying (1 - i / n_grid) * max|w|."""
    out_f, in_f = w.shape
    gs = resolve_group_size(cfg.w_group_size, in_f)
    ng = in_f // gs
    xg = x.float().reshape(-1, ng, gs).transpose(0, 1)  # [ng, n_tok, gs]
    n_tok = xg.shape[1]
    oc_batch = max(1, min(out_f, (1 << 26) // max(1, ng * n_tok)))  # keeps [ng, n_tok, oc] near 256 MiB fp32
    best_all = []
    for o in range(0, out_f, oc_batch):
        wb = w[o : o + oc_batch].float()  # [oc, in]
        oc = wb.shape[0]
        wg = wb.view(oc, ng, gs)
        org_out = torch.bmm(xg, wg.permute(1, 2, 0))  # [ng, n_tok, oc]
        org_max = wg.abs().amax(dim=-1, keepdim=True)  # [oc, ng, 1]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, math.inf)
        for i_s in range(int(cfg.max_shrink * cfg.n_grid)):
            max_val = org_max * (1 - i_s / cfg.n_grid)
            cur = torch.clamp(wg, -max_val, max_val)
            qw = fake_quantize(cur.view(oc, in_f), cfg.w_bits, gs).view(oc, ng, gs)
            err = (torch.bmm(xg, qw.permute(1, 2, 0)) - org_out).pow(2).mean(dim=1)  # [ng, oc]
            err = err.t().unsqueeze(-1)  # [oc, ng, 1]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best_all.append(best_max.squeeze(-1))
    return torch.cat(best_all)  # [out, ng]


@torch.no_grad()
def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> None:
    out_f, in_f = w.shape
    ng = max_val.shape[1]
    m = max_val.to(w.dtype).unsqueeze(-1)  # [out, ng, 1]
    wg = w.view(out_f, ng, in_f // ng)
    wg.copy_(torch.clamp(wg, -m, m))


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """x -> x / s at prev's output, W -> W * s at the linears' inputs: the function is unchanged."""
    dtype = linears[0].weight.dtype
    s = s.to(device=linears[0].weight.device, dtype=dtype)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1))
    else:  # a norm: RMSNorm / LayerNorm scale (and shift)
        prev.weight.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s.view(1, -1))


# ----------------------------------------------------------------------------- the layer walk


class _LayerContext:
    """Position ids / embeddings for full-length calibration blocks, and how to call a layer or its attention."""

    def __init__(self, base: nn.Module, arch: ArchSpec, device: torch.device, dtype: torch.dtype, seqlen: int):
        self.position_ids = torch.arange(seqlen, device=device).unsqueeze(0)  # [1, T]
        self.position_embeddings = None
        rotary = getattr(base, arch.rotary, None)
        if rotary is not None:
            rotary.to(device)
            probe = torch.zeros(1, seqlen, 1, device=device, dtype=dtype)
            self.position_embeddings = rotary(probe, self.position_ids)  # (cos, sin): [1, T, head_dim]

    @staticmethod
    def _first(out):
        return out[0] if isinstance(out, tuple) else out

    def layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = layer(
            x,
            attention_mask=None,  # with SDPA: is_causal
            position_ids=self.position_ids,
            position_embeddings=self.position_embeddings,
            use_cache=False,
        )
        return self._first(out)

    def attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._first(attn(hidden_states=x, position_embeddings=self.position_embeddings, attention_mask=None))


def _group_applies(layer: nn.Module, group: ScaleGroup) -> bool:
    """A linear -> linear fold needs prev's output width to equal the input width (skips GQA's v_proj -> o_proj)."""
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        return prev.out_features == layer.get_submodule(group.linears[0]).in_features
    return True


def check_layer_shapes(layer: nn.Module, arch: ArchSpec, group_size: int) -> None:
    for name in arch.linears:
        lin = layer.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{name} is a {type(lin).__name__}, expected nn.Linear")
        gs = lin.in_features if group_size == -1 else group_size
        if lin.in_features % gs:
            raise ValueError(
                f"--w-group-size {group_size} does not divide the input width {lin.in_features} of {name}; "
                f"pick a group size that divides every linear's input width (e.g. 128, 64 or 32)"
            )
        if lin.out_features % PACK_FACTOR:
            raise ValueError(
                f"{name} has {lin.out_features} outputs; the AutoAWQ GEMM layout needs a multiple of {PACK_FACTOR}"
            )


class LayerWalker:
    """Quantizes the decoder layers of `model` one at a time on `device`; everything else stays on the CPU."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchSpec,
        cfg: AWQConfig,
        device: str | torch.device,
        progress=None,
        cancel: threading.Event | Callable[[], bool] | None = None,
        on_layer: Callable[[int, list[QuantizedLinear]], None] | None = None,
    ):
        self.model, self.arch, self.cfg = model, arch, cfg
        self.device = torch.device(device)
        self.progress = as_progress(progress)
        self.cancel = cancel
        self.on_layer = on_layer or (lambda idx, records: None)
        self.layers_path, self.layers = find_layers(model, arch)
        self.base = model.get_submodule(self.layers_path.rsplit(".", 1)[0])
        self.dtype = next(self.layers[0].parameters()).dtype
        check_layer_shapes(self.layers[0], arch, cfg.w_group_size)

    # -- helpers

    def _emit(self, done: int, message: str) -> None:
        self.progress.on_progress("quantize", done, len(self.layers), message)

    def _quantize_linears(self, layer: nn.Module, prefix: str) -> list[QuantizedLinear]:
        records = []
        for name in self.arch.linears:
            lin = layer.get_submodule(name)
            q, scales, zeros = quantize(lin.weight.data, self.cfg.w_bits, self.cfg.w_group_size)
            bias = lin.bias.data.clone() if lin.bias is not None else None
            records.append(QuantizedLinear(f"{prefix}.{name}", q, scales, zeros, bias))
            lin.weight.data.copy_(dequantize(q, scales, zeros, dtype=lin.weight.dtype))
        return records

    def _chunk_samples(self, seqlen: int) -> int:
        return max(1, self.cfg.chunk_tokens // seqlen)

    # -- entry points

    @torch.no_grad()
    def run(self, samples: torch.Tensor | None = None) -> list[LayerStats]:
        if self.cfg.method == "rtn":
            return self._run_rtn()
        if samples is None or samples.dim() != 2 or samples.numel() == 0:
            raise ValueError("AWQ needs calibration token ids of shape [n_samples, seqlen]")
        return self._run_awq(samples)

    def _run_rtn(self) -> list[LayerStats]:
        stats = []
        for idx, layer in enumerate(self.layers):
            check_cancel(self.cancel, f"before layer {idx}/{len(self.layers)}")
            t0 = time.perf_counter()
            self._emit(idx, f"layer {idx + 1}/{len(self.layers)}: round to nearest")
            try:
                layer.to(self.device)
                self.on_layer(idx, self._quantize_linears(layer, f"{self.layers_path}.{idx}"))
            finally:
                layer.to("cpu")
            stats.append(LayerStats(idx, seconds=time.perf_counter() - t0))
        self._emit(len(self.layers), "done")
        return stats

    def _embed(self, samples: torch.Tensor) -> torch.Tensor:
        """Layer 0's inputs for every sample: [N, T, hidden] in the model dtype, on the CPU (pinned for CUDA)."""
        embed = getattr(self.base, self.arch.embed)
        embed.to(self.device)
        n, t = samples.shape
        pin = self.device.type == "cuda"
        hidden = torch.empty(n, t, embed.embedding_dim, dtype=self.dtype, pin_memory=pin)
        chunk = self._chunk_samples(t)
        for i in range(0, n, chunk):
            hidden[i : i + chunk].copy_(embed(samples[i : i + chunk].to(self.device)), non_blocking=pin)
        if pin:
            torch.cuda.synchronize(self.device)
        embed.to("cpu")
        return hidden

    def _run_awq(self, samples: torch.Tensor) -> list[LayerStats]:
        n, seqlen = samples.shape
        self._emit(0, f"embedding {n} calibration samples of {seqlen} tokens")
        stats = []
        try:
            hidden = self._embed(samples)
            ctx = _LayerContext(self.base, self.arch, self.device, self.dtype, seqlen)
            for idx, layer in enumerate(self.layers):
                check_cancel(self.cancel, f"before layer {idx}/{len(self.layers)}")
                t0 = time.perf_counter()
                try:
                    layer.to(self.device)
                    st = self._awq_layer(idx, layer, hidden, ctx)
                finally:
                    layer.to("cpu")  # also when cancelled mid-layer: the caller's process keeps no GPU memory
                st.seconds = time.perf_counter() - t0
                stats.append(st)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            for name in (self.arch.embed, self.arch.rotary):
                module = getattr(self.base, name, None)
                if module is not None:
                    module.to("cpu")
        return stats  # the last layer's event already said done == total

    def _awq_layer(self, idx: int, layer: nn.Module, hidden: torch.Tensor, ctx: _LayerContext) -> LayerStats:
        cfg, arch, dev = self.cfg, self.arch, self.device
        n, seqlen, _ = hidden.shape
        chunk = self._chunk_samples(seqlen)
        n_search = min(n, max(1, cfg.search_tokens // seqlen))
        n_report = min(n, max(1, cfg.report_tokens // seqlen))
        total = len(self.layers)
        tag = f"layer {idx + 1}/{total}"
        st = LayerStats(idx)

        # 1. one pass over all samples: group-input statistics and search inputs; fp outputs -> next layer's inputs
        self._emit(idx, f"{tag}: capturing activations")
        sites = {g.linears[0]: g for g in arch.groups}
        absum = {}
        feats = {}
        for site in sites:
            lin = layer.get_submodule(site)
            absum[site] = torch.zeros(lin.in_features, dtype=torch.float32, device=dev)
            feats[site] = torch.empty(n_search, seqlen, lin.in_features, dtype=self.dtype, device=dev)
        row = [0]

        def make_hook(site: str):
            def hook(_mod, args):
                x = args[0]  # [b, T, in]
                absum[site] += torch.linalg.vector_norm(x, ord=1, dim=(0, 1), dtype=torch.float32)
                start = row[0]
                if start < n_search:
                    take = min(start + x.shape[0], n_search) - start
                    feats[site][start : start + take].copy_(x[:take])

            return hook

        layer_inputs = hidden.clone() if cfg.quantized_inputs else None  # hidden is overwritten below
        handles = [layer.get_submodule(s).register_forward_pre_hook(make_hook(s)) for s in sites]
        x_rep = torch.empty(n_report, seqlen, hidden.shape[2], dtype=self.dtype, device=dev)
        fp_rep = torch.empty_like(x_rep)
        try:
            for i in range(0, n, chunk):
                row[0] = i
                x = hidden[i : i + chunk].to(dev, non_blocking=True)
                out = ctx.layer(layer, x)
                if i < n_report:
                    take = min(i + x.shape[0], n_report) - i
                    x_rep[i : i + take].copy_(x[:take])
                    fp_rep[i : i + take].copy_(out[:take])
                hidden[i : i + chunk].copy_(out, non_blocking=True)
        finally:
            for h in handles:
                h.remove()
        n_tokens = n * seqlen
        st.out_mean_square = fp_rep.float().pow(2).mean().item()

        # 2. RTN reference error on the report tokens: the untouched weights, rounded to nearest for a moment
        if cfg.compare_rtn:
            self._emit(idx, f"{tag}: RTN reference error")
            linears = [layer.get_submodule(name) for name in arch.linears]
            originals = [lin.weight.data for lin in linears]
            try:
                for lin, w0 in zip(linears, originals, strict=True):
                    lin.weight.data = fake_quantize(w0, cfg.w_bits, cfg.w_group_size)
                st.mse_rtn = _chunked_sq_error(lambda xc: ctx.layer(layer, xc), x_rep, fp_rep, chunk)
            finally:
                for lin, w0 in zip(linears, originals, strict=True):
                    lin.weight.data = w0

        # 3. scale search per group (all on the untouched layer, as AutoAWQ), then fold
        found: list[tuple[ScaleGroup, torch.Tensor]] = []
        for g in arch.groups:
            if not _group_applies(layer, g):
                continue
            check_cancel(self.cancel, f"in {tag}")
            self._emit(idx, f"{tag}: scale search after {g.prev}")
            linears = [layer.get_submodule(name) for name in g.linears]
            if g.inspect is None:
                inspect_fn = linears[0]
            elif g.takes_attention_inputs:
                attn = layer.get_submodule(g.inspect)
                inspect_fn = lambda xc, attn=attn: ctx.attention(attn, xc)  # noqa: E731
            else:
                inspect_fn = layer.get_submodule(g.inspect)
            x_mean = absum[g.linears[0]] / n_tokens
            s, info = search_best_scale(inspect_fn, linears, feats[g.linears[0]], x_mean, cfg, chunk)
            st.scale_search[g.prev] = info
            found.append((g, s))
        for g, s in found:
            linears = [layer.get_submodule(name) for name in g.linears]
            fold_scale(layer.get_submodule(g.prev), linears, s)
            feats[g.linears[0]].div_(s.to(device=dev, dtype=self.dtype))  # inputs as the scaled linears see them

        # 4. clip search per linear
        if cfg.clip:
            self._emit(idx, f"{tag}: clip search")
            site_of = {name: g.linears[0] for g in arch.groups for name in g.linears}
            for name in arch.linears:
                if name in arch.no_clip:
                    continue
                check_cancel(self.cancel, f"in {tag}")
                x = feats[site_of[name]].view(-1, feats[site_of[name]].shape[-1])
                x = x[:: max(1, x.shape[0] // cfg.clip_tokens)][: cfg.clip_tokens]
                w = layer.get_submodule(name).weight.data
                max_val = search_best_clip(w, x, cfg)
                org_max = w.float().abs().view(w.shape[0], max_val.shape[1], -1).amax(-1)
                st.clip[name] = (max_val / org_max.clamp(min=1e-12)).mean().item()
                apply_clip(w, max_val)
        feats.clear()

        # 5. quantize; the in-memory layer keeps the fake-quantized weights
        self._emit(idx, f"{tag}: quantizing")
        self.on_layer(idx, self._quantize_linears(layer, f"{self.layers_path}.{idx}"))
        st.mse_awq = _chunked_sq_error(lambda xc: ctx.layer(layer, xc), x_rep, fp_rep, chunk)
        if layer_inputs is not None:  # the next layer calibrates on what the quantized model will feed it
            self._emit(idx, f"{tag}: quantized outputs for the next layer")
            for i in range(0, n, chunk):
                out = ctx.layer(layer, layer_inputs[i : i + chunk].to(dev, non_blocking=True))
                hidden[i : i + chunk].copy_(out, non_blocking=True)
        self._emit(idx + 1, f"{tag} done")
        return st


def quantize_layers(
    model: nn.Module,
    arch: ArchSpec,
    samples: torch.Tensor | None,
    cfg: AWQConfig,
    *,
    device: str | torch.device = "cpu",
    progress=None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    on_layer: Callable[[int, list[QuantizedLinear]], None] | None = None,
) -> list[LayerStats]:
    """Quantize every decoder layer of an in-memory model in place (weights become fake-quantized)."""
    return LayerWalker(model, arch, cfg, device, progress, cancel, on_layer).run(samples)
