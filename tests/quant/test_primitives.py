"""Quantize / dequantize / pack / unpack: exact AutoAWQ GEMM layout, bit-exact round trips."""

from __future__ import annotations

import pytest
import torch

from quant.primitives import (
    AWQ_ORDER,
    AWQ_REVERSE_ORDER,
    dequantize,
    dequantize_awq,
    fake_quantize,
    pack_awq,
    pack_int4,
    quantize,
    unpack_awq,
    unpack_int4,
)


def autoawq_pack_loop(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM.from_linear packing loop, restated: column-wise, nibble i <- column order_map[i]."""
    rows, cols = intweight.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]].to(torch.int64) << (i * 4)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def autoawq_unpack(qweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's unpack_awq + reverse_awq_order (packing_utils), restated."""
    shifts = torch.arange(0, 32, 4)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    order = torch.arange(iweights.shape[-1]).view(-1, 8)[:, list(AWQ_REVERSE_ORDER)].view(-1)
    return torch.bitwise_and(iweights[:, order], 15)


def test_orders_are_inverse_permutations():
    assert [AWQ_ORDER[AWQ_REVERSE_ORDER[j]] for j in range(8)] == list(range(8))


def test_hand_built_nibbles():
    # columns 0..7 hold the values 0..7: nibble k must hold AWQ_ORDER[k] -> 0x75316420
    row = torch.arange(8).view(1, 8)
    assert pack_int4(row).item() == 0x75316420
    # values 8..15 set the top bit: nibbles 8,10,12,14,9,11,13,15 -> 0xFDB9ECA8 as a signed int32
    packed = pack_int4(row + 8).item()
    assert packed == 0xFDB9ECA8 - 2**32
    # a single non-zero column lands in exactly the nibble AWQ_REVERSE_ORDER says
    for col in range(8):
        one = torch.zeros(1, 8, dtype=torch.int64)
        one[0, col] = 0xF
        assert pack_int4(one).item() & 0xFFFFFFFF == 0xF << (4 * AWQ_REVERSE_ORDER[col])
    assert unpack_int4(torch.tensor([[0x75316420]], dtype=torch.int32)).tolist() == [list(range(8))]


def test_pack_matches_autoawq_loop_and_unpack_matches_autoawq():
    g = torch.Generator().manual_seed(0)
    ints = torch.randint(0, 16, (24, 64), generator=g)
    packed = pack_int4(ints)
    assert packed.dtype == torch.int32 and packed.shape == (24, 8)
    assert torch.equal(packed, autoawq_pack_loop(ints))
    assert torch.equal(unpack_int4(packed).long(), ints)
    assert torch.equal(autoawq_unpack(packed).long(), ints)


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_pack_awq_layout_and_round_trip(group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=g)  # [out, in]
    q, scales, zeros = quantize(w, 4, group_size)
    n_groups = 128 // (128 if group_size == -1 else group_size)
    assert q.shape == (48, 128) and scales.shape == (48, n_groups) and zeros.shape == (48, n_groups)
    qweight, qzeros, s = pack_awq(q, scales, zeros)
    assert qweight.dtype == torch.int32 and qweight.shape == (128, 48 // 8)  # [in, out / 8]
    assert qzeros.dtype == torch.int32 and qzeros.shape == (n_groups, 48 // 8)  # [in / G, out / 8]
    assert s.dtype == torch.float16 and s.shape == (n_groups, 48)  # [in / G, out]
    q2, s2, z2 = unpack_awq(qweight, qzeros, s)
    assert torch.equal(q2, q) and torch.equal(s2, scales) and torch.equal(z2, zeros)
    assert torch.equal(autoawq_unpack(qweight).t().to(torch.uint8), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantized_equals_fake_quantized_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(64, 256, generator=g) * 0.05).to(dtype)
    w[3, 5] = 0.9  # an outlier, so some groups have a wide range
    fq = fake_quantize(w, 4, 128)
    assert fq.dtype == dtype
    qweight, qzeros, scales = pack_awq(*quantize(w, 4, 128))
    deq = dequantize_awq(qweight, qzeros, scales, dtype=dtype)
    assert torch.equal(deq, fq)
    # and what a GEMM kernel computes, (q - z) * s in fp16, is the same fp16 weight
    q, s, z = unpack_awq(qweight, qzeros, scales)
    kernel = (q.half() - z.half().repeat_interleave(128, 1)) * s.repeat_interleave(128, 1)
    assert torch.equal(kernel, dequantize(q, s, z, torch.float16))
    if dtype != torch.bfloat16:
        assert torch.equal(kernel, fq.half())


def test_quantize_matches_autoawq_formula():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    q, scales, zeros = quantize(w, 4, 32)
    wg = w.view(16, 2, 32)
    s_ref = ((wg.amax(-1) - wg.amin(-1)).clamp(min=1e-5) / 15).half()
    z_ref = (-torch.round(wg.amin(-1) / s_ref.float())).clamp(0, 15)
    q_ref = (torch.round(wg / s_ref.float()[..., None]) + z_ref[..., None]).clamp(0, 15)
    assert torch.equal(scales, s_ref)
    assert torch.equal(zeros, z_ref.int())
    assert torch.equal(q, q_ref.view(16, 64).to(torch.uint8))
    err = (dequantize(q, scales, zeros, torch.float32) - w).abs()
    assert (err <= scales.float().repeat_interleave(32, 1) * 0.5 + 1e-6).all()  # within half a step


@pytest.mark.parametrize("bits", [3, 8])
def test_other_widths_fake_quantize_but_do_not_pack(bits):
    w = torch.randn(8, 64)
    q, scales, zeros = quantize(w, bits, 64)
    assert int(q.max()) <= 2**bits - 1
    assert len(torch.unique(fake_quantize(w, bits, 64)[0])) <= 2**bits
    with pytest.raises(ValueError, match="4-bit values only"):
        pack_awq(q, scales, zeros, bits=bits)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(8, 96), 4, 64)
