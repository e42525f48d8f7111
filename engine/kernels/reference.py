"""Plain-torch versions of every engine op: the CPU path, and the ground truth the Triton kernels are tested against.

Paged KV cache layout (one pair of tensors per layer):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim_stored] (logical shape; indexed as such)
        quant_policy 0: model dtype, head_dim_stored = head_dim
        quant_policy 8: uint8,       head_dim_stored = head_dim
        quant_policy 4: uint8,       head_dim_stored = head_dim // 2; byte j holds element j in its low nibble
                                     and element j + head_dim // 2 in its high nibble (halves, not neighbours,
                                     so kernels dequantize two contiguous half-vectors without an interleave)
        Storage: head_dim contiguous, except the quantized V cache, which the model runner stores token-minor:
        a [num_blocks, num_kv_heads, head_dim_stored, block_size] tensor viewed through .permute(0, 3, 1, 2).
        (Decode's P @ V dot reduces over tokens; with a block's tokens adjacent, 8-bit codes reach it four to a
        word instead of byte by byte.) Code below indexes logically and works with either storage.
    k_scale_zero, v_scale_zero: [num_blocks, num_kv_heads, G, block_size, 2], only when quantized: [b, h, g, s] is
        the (scale, min) pair of group g of the token in slot s of block b, head h; G = KV_GROUPS[quant_policy]: int4
        has one pair per half (g = 0: elements d < head_dim / 2, g = 1: the rest), int8 one for the whole vector.
        fp32 for fp32 models, else fp16. (Head-major, then group, so a block's pairs for one head and group are
        contiguous: decode loads a tile's worth with one vector load.)
Quantization (kv_rotates / quantize_kv): a head vector is first rotated by the orthonormal Hadamard matrix of
head_dim (when head_dim / 2 is a power of two >= 16; Sylvester order, so H = [[A, A], [A, -A]] on the halves and
H = H^T = H^-1), which spreads outlier channels over the whole vector; then each group (int4: each half, int8: the
vector) is quantized asymmetrically on its own, with the zero point stored as the clipped minimum:
q = clamp(round((x - min) / scale), 0, 2**bits - 1), x ~= q * scale + min. int4 picks, per half, the clipping ratio r
of KV_CLIP_RATIOS (min = r * min(x), max = r * max(x)) with the smallest squared error. The cache thus holds K H and
V H: attention kernels rotate q (q.k = qH . kH) and rotate the attention output back (sum p_n v_n = (sum p_n v_n H) H).
(Storing min rather than an integer zero point keeps both numbers representable in fp16: a zero point of -min / scale
overflows fp16 for vectors whose range is tiny next to their mean, and a constant vector would need scale 0.)
A token's slot is block_id * block_size + offset; slot_mapping gives each new token's slot (-1: skip).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm; with `residual`, first x = x + residual and return (normed, x) like a fused add-norm."""
    if residual is not None:
        x = x + residual
        residual_out = x
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (out * weight.float()).to(x.dtype)
    return out if residual is None else (out, residual_out)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * inter] -> [num_tokens, inter]: silu(gate) * up with gate the first half."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate-half RoPE (the HF Llama convention). q: [N, Hq, D], k: [N, Hk, D], cos/sin: [N, D // 2]."""

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[:, None, :].float(), sin[:, None, :].float()
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T (+ bias): the nn.Linear product."""
    return F.linear(x, weight, bias)


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(silu_and_mul(x)): a gated MLP's activation and down projection."""
    return F.linear(silu_and_mul(x), weight, bias)


KV_CLIP_RATIOS = {8: (1.0,), 4: tuple((40 - i) / 40 for i in range(8))}  # bits -> clipping ratios searched
KV_GROUPS = {8: 1, 4: 2}  # bits -> (scale, min) groups per head vector: int4 one per half (+4 bytes a head)


def kv_rotates(head_dim: int) -> bool:
    """Whether quantized caches of this head_dim hold Hadamard-rotated vectors (head_dim / 2 a power of two >= 16:
    the kernels' rotation is a 16-bit-exact tl.dot with a [head_dim / 2]^2 matrix of signs)."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half >= 16 and half & (half - 1) == 0


def hadamard(head_dim: int, device=None) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix [head_dim, head_dim] fp32: entry (i, j) = (-1)^popcount(i & j) /
    sqrt(head_dim). Symmetric and its own inverse."""
    i = torch.arange(head_dim, device=device)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1.0 - 2.0 * parity.float()) / math.sqrt(head_dim)


def quantize_kv(x: torch.Tensor, bits: int):
    """x: [N, H, D] -> (q uint8 [N, H, D or D // 2], scale_zero [N, H, G, 2] float32 holding (scale, min) per group),
    of x rotated when kv_rotates(D) (the layout notes above)."""
    qmax = (1 << bits) - 1
    xf = x.float()
    head_dim = xf.shape[-1]
    if kv_rotates(head_dim):
        xf = xf @ hadamard(head_dim, xf.device)
    groups = KV_GROUPS[bits]
    xf = xf.unflatten(-1, (groups, head_dim // groups))  # [N, H, G, D / G]
    mn0, mx0 = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    best = None
    for r in torch.tensor(KV_CLIP_RATIOS[bits], dtype=torch.float32).tolist():  # fp32 ratios, first best kept
        mn, mx = mn0 * r, mx0 * r
        scale = ((mx - mn) / qmax).clamp_min(1e-8)
        q = torch.clamp(torch.round((xf - mn) / scale), 0, qmax)
        err = (q * scale + mn - xf).square().sum(-1, keepdim=True)
        if best is None:
            best = (q, scale, mn, err)
        else:
            better = err < best[3]
            best = tuple(torch.where(better, new, old) for new, old in zip((q, scale, mn, err), best))
    q, scale, mn, _ = best
    q = q.to(torch.uint8).flatten(-2)
    if bits == 4:
        q = q[..., : head_dim // 2] | (q[..., head_dim // 2 :] << 4)
    return q, torch.cat([scale, mn], dim=-1)


def dequantize_kv(q: torch.Tensor, scale_zero: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_kv (rotation undone): q [..., D or D // 2] uint8, scale_zero [..., G, 2] -> [..., D]."""
    if bits == 4:
        q = torch.cat([q & 0xF, q >> 4], dim=-1)
    head_dim = q.shape[-1]
    scale, mn = scale_zero[..., :1].float(), scale_zero[..., 1:].float()  # [..., G, 1]
    groups = scale_zero.shape[-2]
    x = (q.unflatten(-1, (groups, head_dim // groups)).float() * scale + mn).flatten(-2)
    if kv_rotates(head_dim):
        x = x @ hadamard(head_dim, x.device)
    return x.to(dtype)


def store_kv(
    k: torch.Tensor,  # [N, Hk, D]
    v: torch.Tensor,  # [N, Hk, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [N] int, -1 = skip
    k_scale_zero: torch.Tensor | None = None,
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
) -> None:
    """Write new tokens' keys and values into their cache slots, quantizing when quant_policy is 8 or 4."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k, v = k[keep], v[keep]
    if quant_policy == 0:
        k_cache[blocks, offsets] = k.to(k_cache.dtype)
        v_cache[blocks, offsets] = v.to(v_cache.dtype)
        return
    for x, cache, sz in ((k, k_cache, k_scale_zero), (v, v_cache, v_scale_zero)):
        q, scale_zero = quantize_kv(x, quant_policy)  # [N, Hk, D or D // 2], [N, Hk, G, 2]
        cache[blocks, offsets] = q
        sz[blocks, :, :, offsets] = scale_zero.to(sz.dtype)  # indices split by slices: indexed dim first


def rotary_store_kv(
    q: torch.Tensor,  # [N, Hq, D]
    k: torch.Tensor,  # [N, Hk, D]
    v: torch.Tensor,  # [N, Hk, D]
    cos: torch.Tensor,  # [N, D // 2]
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [N] int, -1 = skip
    k_scale_zero: torch.Tensor | None = None,
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
) -> torch.Tensor:
    """apply_rotary then store_kv, as one op (the attention layer's first step): q is rotated in place and
    returned, the rotated keys (rounded to k's dtype, then quantized if so) and v go to the cache. k itself is left
    as it was: nothing reads it after the cache, so the fused kernel does not write it back."""
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    store_kv(k_rot, v, k_cache, v_cache, slot_mapping, k_scale_zero, v_scale_zero, quant_policy)
    return q.copy_(q_rot)


def gather_kv(
    cache: torch.Tensor,
    scale_zero: torch.Tensor | None,
    block_table: torch.Tensor,  # [max_blocks] of one sequence
    length: int,
    quant_policy: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One sequence's first `length` cached tokens as [length, Hk, D] in `dtype`."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    x = cache[ids].flatten(0, 1)[:length]
    if quant_policy == 0:
        return x.to(dtype)
    sz = scale_zero[ids].permute(0, 3, 1, 2, 4).flatten(0, 1)[:length]  # [nb, Hk, G, bs, 2] -> [length, Hk, G, 2]
    return dequantize_kv(x, sz, quant_policy, dtype)


def _attend(q, k, v, scale, q_start):
    """q: [Lq, Hq, D] at positions q_start..q_start+Lq-1; k, v: [Lk, Hk, D]; causal. -> [Lq, Hq, D]."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [Hq, Lq, Lk]
    q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + q_start
    k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, Hq, D], the new tokens of all sequences, packed
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    cu_seqlens_q: torch.Tensor,  # [B + 1] offsets of each sequence's new tokens in q
    kv_lens: torch.Tensor,  # [B] tokens in cache per sequence, new ones included (already stored)
    scale: float,
    k_scale_zero: torch.Tensor | None = None,
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context (prefix hits and earlier
    chunks included): the new tokens sit at the last q_len positions of the kv_len cached ones."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = kv_lens.tolist()
    for i in range(len(lens)):
        qs = q[cu[i] : cu[i + 1]]
        k = gather_kv(k_cache, k_scale_zero, block_tables[i], lens[i], quant_policy, q.dtype)
        v = gather_kv(v_cache, v_scale_zero, block_tables[i], lens[i], quant_policy, q.dtype)
        out[cu[i] : cu[i + 1]] = _attend(qs, k, v, scale, lens[i] - qs.shape[0])
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one new token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    kv_lens: torch.Tensor,  # [B], the new token included
    scale: float,
    k_scale_zero: torch.Tensor | None = None,
    v_scale_zero: torch.Tensor | None = None,
    quant_policy: int = 0,
) -> torch.Tensor:
    cu_seqlens_q = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    return paged_prefill_attention(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, k_scale_zero, v_scale_zero, quant_policy
    )


# ---- W4A16 (AWQ GEMM layout) ------------------------------------------------------------------------------
# qweight int32 [in, out / 8]: nibble i (bits 4i..4i+3) of element [k, c] holds column c * 8 + AWQ_ORDER[i];
# qzeros int32 [in / G, out / 8] packed the same way; scales [in / G, out].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] in AWQ order -> int32 [rows, cols] with values 0..15 in natural column order."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed[:, :, None] >> shifts) & 0xF  # [rows, cols / 8, 8], nibble i
    order = torch.tensor(AWQ_REVERSE_ORDER, device=packed.device)
    return nibbles[:, :, order].reshape(packed.shape[0], -1)


def awq_dequantize(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """-> [in, out] weight in scales' dtype: (q - zero) * scale per group of `group_size` input rows."""
    q = awq_unpack(qweight)  # [in, out]
    z = awq_unpack(qzeros).repeat_interleave(group_size, dim=0)  # [in, out]
    s = scales.repeat_interleave(group_size, dim=0)
    return ((q - z).to(scales.dtype) * s).to(scales.dtype)


def awq_linear(x, qweight, qzeros, scales, group_size: int, bias=None):
    """x [tokens, in] @ dequantized W [in, out] (+ bias)."""
    w = awq_dequantize(qweight, qzeros, scales, group_size).to(x.dtype)
    out = x @ w
    return out if bias is None else out + bias


# K-packed layout (what AWQLinear repacks qweight into for the GPU kernels, see kernels/awq_gemm.py):
# qweight_k int32 [out, in / 8], read as int16 [out, in / 4]; the input rows run in chunks of C = min(G, 128); int16
# t (0 <= t < C / 4) of chunk c holds in bits 4i..4i+3 (i = 0..3) the code of input row C c + (C / 4) i + t.
# qzeros and scales keep the AWQ GEMM layout.
def awq_unpack_k(qweight_k: torch.Tensor, group_size: int) -> torch.Tensor:
    """int32 [out, in / 8] K-packed -> int32 [out, in] with values 0..15."""
    rows, cols = qweight_k.shape
    chunk = min(group_size, 128)
    q16 = qweight_k.contiguous().view(torch.int16).to(torch.int32)  # [out, in / 4]
    shifts = torch.arange(0, 16, 4, device=qweight_k.device, dtype=torch.int32)
    nibbles = (q16.reshape(rows, cols * 8 // chunk, chunk // 4)[..., None] >> shifts) & 0xF  # [out, c, t, i]
    return nibbles.transpose(2, 3).reshape(rows, cols * 8)  # input row C c + (C / 4) i + t


def awq_dequantize_k(qweight_k, qzeros, scales, group_size: int) -> torch.Tensor:
    """K-packed weights -> [in, out] weight in scales' dtype, as awq_dequantize."""
    q = awq_unpack_k(qweight_k, group_size).t()  # [in, out]
    z = awq_unpack(qzeros).repeat_interleave(group_size, dim=0)
    s = scales.repeat_interleave(group_size, dim=0)
    return ((q - z).to(scales.dtype) * s).to(scales.dtype)


def awq_linear_k(x, qweight_k, qzeros, scales, group_size: int, bias=None):
    """x [tokens, in] @ dequantized K-packed W [in, out] (+ bias)."""
    out = x @ awq_dequantize_k(qweight_k, qzeros, scales, group_size).to(x.dtype)
    return out if bias is None else out + bias
