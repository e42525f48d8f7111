"""Weight quantization primitives: group-wise asymmetric (zero point) quantize / dequantize / fake-quantize,
and pack / unpack in the exact AutoAWQ GEMM layout.

Conventions (all AutoAWQ's, so the folders this tool writes load wherever AutoAWQ ones do):
- a linear's weight is [out, in] (torch layout); groups run along `in`, `group_size` input channels each;
- scale = (max - min).clamp(min=1e-5) / (2**bits - 1) per (output row, group), stored as fp16;
- zero  = clamp(-round(min / scale), 0, 2**bits - 1), an integer;
- q     = clamp(round(w / scale) + zero, 0, 2**bits - 1); w_hat = (q - zero) * scale.
The fp16 rounding of the scale happens *before* q and zero are computed, and w_hat is computed in fp32 then cast,
so `dequantize(quantize(w))` here, a GEMM kernel doing (q - z) * s in fp16, and `fake_quantize(w)` agree bit for bit.

AutoAWQ GEMM layout (4-bit only: AutoAWQ's WQLinear_GEMM refuses other widths, and so does `pack_awq`):
- qweight int32 [in, out / 8]: packed value c of row i holds columns 8c .. 8c+7 of that row, nibble k (bits 4k..4k+3)
  holding column 8c + AWQ_ORDER[k];
- qzeros  int32 [in / group_size, out / 8], same packing;
- scales  fp16  [in / group_size, out].
`quantize` / `dequantize` / `fake_quantize` work for any width from 2 to 8 bits (what the search uses); only the
packing is tied to 4 bits.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a packed int32 holds column AWQ_ORDER[k] of its 8 columns
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of 8 sits in nibble AWQ_REVERSE_ORDER[j]
PACK_BITS = 4  # the only width the AutoAWQ GEMM layout defines
PACK_FACTOR = 32 // PACK_BITS  # values per int32
MIN_BITS, MAX_BITS = 2, 8
SCALE_DTYPE = torch.float16  # storage dtype of scales in the GEMM layout


def resolve_group_size(group_size: int, in_features: int) -> int:
    """AutoAWQ's convention: -1 means one group over the whole input width. Raises if it does not divide it."""
    gs = in_features if group_size == -1 else group_size
    if gs <= 0:
        raise ValueError(f"group size must be positive or -1 (one group per row), got {group_size}")
    if in_features % gs:
        raise ValueError(f"group size {gs} does not divide the input width {in_features}")
    return gs


def _check_bits(bits: int) -> int:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return bits


def compute_qparams(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales (fp16) and zero points (int32) of a [out, in] weight: [out, in / group_size] each."""
    max_int = 2 ** _check_bits(bits) - 1
    out_f, in_f = w.shape
    gs = resolve_group_size(group_size, in_f)
    wg = w.detach().float().reshape(out_f, in_f // gs, gs)  # [out, n_groups, gs]
    w_max = wg.amax(dim=-1)
    w_min = wg.amin(dim=-1)
    scales = ((w_max - w_min).clamp(min=1e-5) / max_int).to(SCALE_DTYPE)  # [out, n_groups]
    zeros = (-torch.round(w_min / scales.float())).clamp(0, max_int).to(torch.int32)
    return scales, zeros


def quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (q uint8 [out, in], scales fp16 [out, n_groups], zeros int32 [out, n_groups])."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight holds NaN or inf values; cannot quantize it")
    max_int = 2**bits - 1
    scales, zeros = compute_qparams(w, bits, group_size)
    out_f, in_f = w.shape
    n_groups = scales.shape[1]
    wg = w.detach().float().reshape(out_f, n_groups, in_f // n_groups)
    q = torch.round(wg / scales.float().unsqueeze(-1)) + zeros.float().unsqueeze(-1)
    q = q.clamp_(0, max_int).to(torch.uint8).reshape(out_f, in_f)
    return q, scales, zeros


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """(q [out, in], scales [out, n_groups], zeros [out, n_groups]) -> [out, in] weight in `dtype`."""
    out_f, in_f = q.shape
    n_groups = scales.shape[1]
    qg = q.reshape(out_f, n_groups, in_f // n_groups).float()
    w = (qg - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)  # exact in fp32: 8-bit x 11-bit mantissas
    return w.reshape(out_f, in_f).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """Quantize then dequantize, in w's dtype: what the quantized model computes with."""
    q, scales, zeros = quantize(w, bits, group_size)
    return dequantize(q, scales, zeros, dtype=w.dtype)


# ----------------------------------------------------------------------------- AutoAWQ GEMM packing


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints in [0, 15] -> int32 [rows, cols / 8] in AutoAWQ order (nibble k <- column AWQ_ORDER[k])."""
    rows, cols = values.shape
    if cols % PACK_FACTOR:
        raise ValueError(f"AWQ packing needs a column count divisible by {PACK_FACTOR}, got {cols}")
    v = values.to(torch.int64).reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)
    if (v < 0).any() or (v > 15).any():
        raise ValueError("pack_int4 values must lie in [0, 15]")
    v = v[:, :, list(AWQ_ORDER)]  # v[..., k] is the column that goes into nibble k
    shifts = torch.arange(0, 32, PACK_BITS, device=v.device, dtype=torch.int64)  # [8]
    packed = (v << shifts).sum(dim=-1)  # [rows, cols / 8], in [0, 2**32)
    packed = packed - ((packed >> 31) & 1) * (1 << 32)  # reinterpret as signed int32
    return packed.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, n] in AutoAWQ order -> uint8 [rows, n * 8] in natural column order."""
    rows, n = packed.shape
    shifts = torch.arange(0, 32, PACK_BITS, device=packed.device, dtype=torch.int32)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [rows, n, 8]: nibble k
    cols = nibbles[:, :, list(AWQ_REVERSE_ORDER)]  # column j lives in nibble AWQ_REVERSE_ORDER[j]
    return cols.reshape(rows, n * PACK_FACTOR).to(torch.uint8)


def pack_awq(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch-layout (q [out, in], scales [out, G], zeros [out, G]) -> AutoAWQ GEMM (qweight, qzeros, scales)."""
    if bits != PACK_BITS:
        raise ValueError(
            f"the AutoAWQ GEMM layout packs {PACK_BITS}-bit values only (AutoAWQ itself refuses other widths); "
            f"got bits={bits}"
        )
    qweight = pack_int4(q.t().contiguous())  # [in, out / 8]
    qzeros = pack_int4(zeros.t().contiguous())  # [in / gs, out / 8]
    return qweight, qzeros, scales.t().contiguous().to(SCALE_DTYPE)  # scales [in / gs, out]


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM tensors -> torch-layout (q uint8 [out, in], scales fp16 [out, G], zeros int32 [out, G])."""
    q = unpack_int4(qweight).t().contiguous()
    zeros = unpack_int4(qzeros).t().contiguous().to(torch.int32)
    return q, scales.t().contiguous(), zeros


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """AutoAWQ GEMM tensors -> the [out, in] float weight they stand for."""
    q, s, z = unpack_awq(qweight, qzeros, scales)
    return dequantize(q, s, z, dtype=dtype)
