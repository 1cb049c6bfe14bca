"""CPU checks of everything around the CUDA kernels: the tile32 layout, the ops' CPU and
fake kernels, torch's CPU int4 path and the dispatch decisions.

Tolerances are relative Frobenius errors against a float64 matmul of the reference
weight (``qmath.dequantize``): bf16 rounding of x, of the weight and of the output
each contribute up to 2**-9 relative, so a bf16 path lands near 3e-3; we allow 1e-2.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from quant import qmath
from quant.formats import PackedWeight
from quant.kernels import dispatch, layout, ops, reference
from quant.modules import QuantLinear

BF16_TOL = 1e-2


def random_packed(n: int, k: int, group_size: int, sym: bool = False, seed: int | None = None) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    w = torch.randn(n, k, generator=gen)
    scale, zero = qmath.compute_qparams(w, 4, group_size, sym)
    q = qmath.quantize(w, scale, zero, 4, group_size)
    return PackedWeight(q=q, scale=scale.half(), zero=zero.to(torch.int32), bits=4, group_size=group_size)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("n,k,g", [(32, 32, 32), (64, 128, 64), (96, 256, 128), (128, 192, -1), (64, 576, 32)])
@pytest.mark.parametrize("sym", [False, True])
def test_tile32_round_trip_is_exact(n, k, g, sym):
    pw = random_packed(n, k, g, sym)
    kw = layout.repack(pw, torch.float16)
    assert kw.qweight.shape == (k // 32, n // 32, 32, 4) and kw.qweight.dtype == torch.int32
    assert (kw.zeros is None) == sym  # symmetric weights (z = 8 everywhere) carry no zeros
    back = layout.unpack(kw)
    assert torch.equal(back.q, pw.q)
    assert torch.equal(back.scale, pw.scale)
    assert torch.equal(back.zero, pw.zero)


# The fragment table written at the layout's definition (csrc/w4a16_common.cuh), typed in
# independently of layout._fragment_offsets: nibble -> (n offset from g, k offset from 2t).
CUH_NIBBLE_TABLE = {0: (0, 0), 4: (0, 1), 1: (0, 8), 5: (0, 9), 2: (8, 0), 6: (8, 1), 3: (8, 8), 7: (8, 9)}


def test_tile32_words_follow_the_documented_fragment_table():
    pw = random_packed(64, 64, 32)
    words = layout.repack(pw, torch.float16).qweight.to(torch.int64) & 0xFFFFFFFF
    for kt in range(2):
        for nb in range(2):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for w in range(4):
                    kh, nh = divmod(w, 2)
                    for nib, (dn, dk) in CUH_NIBBLE_TABLE.items():
                        n = 32 * nb + 16 * nh + g + dn
                        k = 32 * kt + 16 * kh + 2 * t + dk
                        code = (int(words[kt, nb, lane, w]) >> (4 * nib)) & 0xF
                        assert code == int(pw.q[n, k])


def test_scale_permutation_gives_each_lane_its_four_features():
    pw = random_packed(64, 128, 64)
    kw = layout.repack(pw, torch.float16)
    for grp in range(2):
        for nb in range(2):
            for g in range(8):
                for j in range(4):  # what the kernel reads at column 32nb + 4g + j
                    assert kw.scales[grp, 32 * nb + 4 * g + j] == pw.scale[32 * nb + 8 * j + g, grp]
                    assert kw.zeros[grp, 32 * nb + 4 * g + j] == pw.zero[32 * nb + 8 * j + g, grp]


def _emulate_dequant_word(word: int, zs: list[int], ss: list[float], magic: int, np_dtype) -> list[tuple[float, float]]:
    """Python model of dequant_word<T> (csrc/w4a16_common.cuh) for fp16: 4 pairs (low, high half)."""
    out = []
    for i in range(4):
        biased = ((word >> (4 * i)) & 0x000F000F) | (magic | (magic << 16))
        lo, hi = np.array([biased & 0xFFFF, biased >> 16], dtype=np.uint16).view(np_dtype)
        row = 0 if i < 2 else 1
        zm = np.array([magic | zs[row]], dtype=np.uint16).view(np_dtype)[0]
        s = np_dtype(ss[row])
        out.append((np_dtype(np_dtype(lo - zm) * s), np_dtype(np_dtype(hi - zm) * s)))
    return out


def test_magic_number_dequant_is_bit_exact_for_fp16():
    pw = random_packed(32, 32, 32)
    kw = layout.repack(pw, torch.float16)
    w_ref = pw.dequantize(torch.float16)  # (q - z) * s rounded once to fp16
    words = kw.qweight.to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        g, t = divmod(lane, 4)
        for w in range(4):
            kh, nh = divmod(w, 2)
            rows = [16 * nh + g, 16 * nh + 8 + g]
            zs = [int(pw.zero[r, 0]) for r in rows]
            ss = [float(pw.scale[r, 0]) for r in rows]
            pairs = _emulate_dequant_word(int(words[0, 0, lane, w]), zs, ss, 0x6400, np.float16)
            # out[0] = (row g, k 2t..2t+1), out[1] = (g, 2t+8..), out[2] = (g+8, 2t..), out[3] = (g+8, 2t+8..)
            for i, (lo, hi) in enumerate(pairs):
                r = rows[i // 2]
                k = 16 * kh + 2 * t + 8 * (i % 2)
                assert lo == float(w_ref[r, k]) and hi == float(w_ref[r, k + 1])


@pytest.mark.parametrize("op", ops.OP_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_cpu_kernel_is_the_reference(op, dtype):
    n, k, g = 128, 256, 64
    pw = random_packed(n, k, g)
    bias = torch.randn(n)
    layer = QuantLinear.from_packed(pw, bias.half(), "awq")
    kw = layout.repack(pw, dtype)
    x = torch.randn(7, k).to(dtype)
    y = getattr(torch.ops.qtool, op)(x, kw.qweight, kw.scales, kw.zeros, layer.bias.to(dtype), kw.group_size)
    if dtype == torch.float32:  # fp16 scales are exact in fp32: the same function, bit for bit
        assert torch.equal(y, reference.linear(x, layer))
    else:  # the tile32 layout holds bf16 scales (one extra rounding of the fp16 checkpoint scale)
        assert rel_err(y, reference.linear(x.double(), layer)) < BF16_TOL


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_op_cpu_kernel_is_the_checkpoint_weight(dtype, sym):
    """w4a16_dequant on the tile32 copy gives W of the checkpoint, bit for bit, in the layout's dtype
    (bf16: the scale rounded to bf16 first, as the layout holds it)."""
    n, k, g = 96, 256, 64
    pw = random_packed(n, k, g, sym=sym)
    kw = layout.repack(pw, dtype)
    w = torch.ops.qtool.w4a16_dequant(kw.qweight, kw.scales, kw.zeros, kw.group_size)
    want = PackedWeight(pw.q, pw.scale.to(dtype), pw.zero, 4, g).dequantize(dtype)
    assert w.dtype == dtype and w.shape == (n, k)
    assert torch.equal(w, want)
    meta = torch.ops.qtool.w4a16_dequant(kw.qweight.to("meta"), kw.scales.to("meta"), None, kw.group_size)
    assert meta.shape == (n, k) and meta.dtype == dtype


def test_ops_pass_opcheck_and_fake_shapes():
    pw = random_packed(128, 128, 32)
    kw = layout.repack(pw, torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    for op in ops.OP_NAMES:
        fn = getattr(torch.ops.qtool, op).default
        torch.library.opcheck(fn, (x, kw.qweight, kw.scales, kw.zeros, None, 32))
        meta = fn(x.to("meta"), kw.qweight.to("meta"), kw.scales.to("meta"), None, None, 32)
        assert meta.shape == (3, 128) and meta.dtype == torch.bfloat16


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_ops_refuse_what_the_cuda_binding_refuses(device):
    """The CPU and fake kernels refuse the operands the CUDA binding refuses, naming the operand (they used to
    broadcast wrong-shaped scales, take M > 32 in the GEMV and give any shape on meta tensors)."""
    kw = layout.repack(random_packed(128, 256, 64), torch.float32)
    x = torch.randn(5, 256)
    to = lambda *ts: [None if t is None else t.to(device) for t in ts]  # noqa: E731
    gemv, gemm = torch.ops.qtool.w4a16_gemv, torch.ops.qtool.w4a16_gemm
    cases = [
        (gemv, (x[:, :, None], kw.qweight, kw.scales, kw.zeros, None, 64), "x must be 2-D"),
        (gemv, (x[:, :128], kw.qweight, kw.scales, kw.zeros, None, 64), "qweight covers K=256 but x has K=128"),
        (gemv, (x, kw.qweight.reshape(8, 4, 32, 4)[:, :, :, :2], kw.scales, kw.zeros, None, 64), "qweight must be"),
        (gemv, (x, kw.qweight, kw.scales[:1], kw.zeros, None, 64), r"scales must be \[K/group_size, N\] = \[4, 128\]"),
        (gemv, (x, kw.qweight, kw.scales, kw.zeros[:, :64], None, 64), "zeros must be"),
        (gemv, (x, kw.qweight, kw.scales, kw.zeros, torch.randn(64), 64), "bias must be \\[N\\] with N=128"),
        (gemv, (x, kw.qweight, kw.scales, kw.zeros, None, 96), "divisible by group_size 96"),
        (gemv, (torch.randn(33, 256), kw.qweight, kw.scales, kw.zeros, None, 64), r"M=33 must be in \[1, 32\]"),
        (gemv, (x, kw.qweight, kw.scales, kw.zeros, None, 0), "group_size must be positive"),
        (gemm, (torch.randn(33, 256), kw.qweight, kw.scales, kw.zeros, None, 64), None),  # the GEMM takes any M >= 1
        (gemm, (x[:0], kw.qweight, kw.scales, kw.zeros, None, 64), "M=0 must be at least 1"),
        (gemv, (x[:, :0], kw.qweight[:0], kw.scales[:0], kw.zeros[:0], None, 64), r"empty weight \(N=128, K=0\)"),
    ]
    dequant = torch.ops.qtool.w4a16_dequant
    cases += [(dequant, (kw.qweight, kw.scales[:1], kw.zeros, 64), "scales must be"),
              (dequant, (kw.qweight, kw.scales, kw.zeros[:, :8], 64), "zeros must be"),
              (dequant, (kw.qweight.reshape(8, 128, 4), kw.scales, kw.zeros, 64), "qweight must be"),
              (dequant, (kw.qweight, kw.scales, kw.zeros, 0), "group_size must be positive"),
              (dequant, (kw.qweight, kw.scales[:2], kw.zeros[:2], 128), None)]  # group 128: scales [2, N]
    for op, args, match in cases:
        args = (*to(*args[:-1]), args[-1])
        if match is None:
            assert op(*args).shape in ((33, 128), (128, 256))
        else:
            with pytest.raises(ValueError, match=match):
                op(*args)
    counters = torch.zeros(4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="w4a16_gemv_splitk: qweight must be"):  # the operands before the counters
        torch.ops.qtool.w4a16_gemv_splitk(*to(x, kw.qweight.reshape(8, 128, 4), kw.scales, kw.zeros, None), 64, 2,
                                          counters)


def test_split_k_gemv_op_schema_and_cpu_kernel():
    """The split-K GEMV op: its CPU kernel is the reference whatever the split count, it passes opcheck (the
    counters declared as written), its fake kernel gives [M, N], and it refuses what the CUDA binding refuses."""
    pw = random_packed(128, 256, 64)
    kw = layout.repack(pw, torch.float32)
    x = torch.randn(5, 256)
    counters = torch.zeros(4, dtype=torch.int32)
    fn = torch.ops.qtool.w4a16_gemv_splitk.default
    want = torch.ops.qtool.w4a16_gemv(x, kw.qweight, kw.scales, kw.zeros, None, 64)
    for splits in (1, 3):
        assert torch.equal(fn(x, kw.qweight, kw.scales, kw.zeros, None, 64, splits, counters), want)
    torch.library.opcheck(fn, (x, kw.qweight, kw.scales, kw.zeros, None, 64, 2, counters))
    meta = fn(x.to("meta"), kw.qweight.to("meta"), kw.scales.to("meta"), None, None, 64, 2, counters.to("meta"))
    assert meta.shape == (5, 128)
    for splits in (0, 65):
        with pytest.raises(ValueError, match=f"splits={splits} must be in"):
            fn(x, kw.qweight, kw.scales, kw.zeros, None, 64, splits, counters)
    for bad in (counters[:3], counters.float(), counters.reshape(2, 2)):
        with pytest.raises(ValueError, match="counters must be int32"):
            fn(x, kw.qweight, kw.scales, kw.zeros, None, 64, 2, bad)


@pytest.mark.parametrize("m,n,k,sms,want", [
    (1, 1536, 8960, 132, 8),     # Qwen2.5-1.5B down_proj: 48 strips, K = 5.8 N
    (16, 896, 4864, 132, 8),     # Qwen2.5-0.5B down_proj
    (1, 4096, 14336, 132, 4),    # Llama-3-8B / InternLM2.5-7B down_proj: 128 strips
    (8, 5120, 13824, 132, 4),    # 160 strips: still within 1.25 waves
    (9, 4096, 14336, 132, 2),    # M = 9-16: fewer splits past 64 strips
    (16, 3584, 18944, 132, 2),
    (17, 4096, 14336, 132, 1),   # M > 16: the plain GEMV
    (1, 4096, 4096, 132, 1),     # K < 2N: won under 6% at best
    (1, 14336, 4096, 132, 1),    # gate/up: lost
    (1, 8192, 28672, 132, 1),    # 256 strips, about two waves already: lost
    (1, 8192, 28672, 256, 4),    # the same layer on a GPU with about twice the SMs
    (1, 1536, 8960, 0, 1),       # no GPU named: never split
])
def test_gemv_splits_follows_the_measured_rule(m, n, k, sms, want):
    assert dispatch.gemv_splits(m, n, k, sms) == want


def test_dispatch_picks_split_k_only_with_the_gpus_sm_count():
    down = QuantLinear.from_packed(random_packed(256, 2048, 128), None, "awq")  # 8 strips, K = 8 N
    assert dispatch.cuda_kernel_for(1, down) == ("w4a16_gemv", None)  # sms not given: never split
    assert dispatch.cuda_kernel_for(1, down, sms=132) == (ops.SPLITK_OP, None)
    assert dispatch.cuda_kernel_for(16, down, sms=132) == (ops.SPLITK_OP, None)
    assert dispatch.cuda_kernel_for(17, down, sms=132) == ("w4a16_gemv", None)
    assert dispatch.cuda_kernel_for(dispatch.DEQUANT_MIN_M, down, sms=132) == ("w4a16_dequant", None)
    square = QuantLinear.from_packed(random_packed(256, 256, 128), None, "awq")
    assert dispatch.cuda_kernel_for(1, square, sms=132) == ("w4a16_gemv", None)


def test_split_k_counters_are_per_layer_zeroed_and_made_by_prepare():
    a = QuantLinear.from_packed(random_packed(256, 2048, 128), None, "awq")
    b = QuantLinear.from_packed(random_packed(256, 2048, 128), None, "awq")
    dispatch.prepare_cuda(a, torch.float16, torch.device("cpu"))
    assert ("splitk_counters", "cpu") in a.kernel_cache  # before any capture
    ca = dispatch.splitk_counters(a, torch.device("cpu"))
    assert ca.dtype == torch.int32 and ca.shape == (8,) and not ca.any()
    assert dispatch.splitk_counters(a, "cpu") is ca
    assert dispatch.splitk_counters(b, "cpu") is not ca  # layers never share a set
    assert set(a.state_dict()) == {"qweight", "qzeros", "scales"}  # not a buffer: never saved


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("n,k,g", [(96, 256, 64), (128, 512, 128), (64, 384, -1), (48, 128, 32)])
def test_cpu_int4_path_matches_reference(fmt, n, k, g):
    pw = random_packed(n, k, g, sym=(fmt == "gptq"))
    if fmt == "gptq":
        pw.zero = pw.zero.clamp(min=1)  # v1 GPTQ cannot store z = 0
    layer = QuantLinear.from_packed(pw, torch.randn(n).half(), fmt)
    x = torch.randn(2, 3, k).bfloat16()
    assert dispatch.choose_path(x, layer) == ("cpu_int4", None)
    y = dispatch.linear(x, layer)
    assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
    ref = reference.linear(x.double(), layer)
    assert rel_err(y, ref) < BF16_TOL
    assert "cpu_int4" in layer.kernel_cache and "cpu_int4" not in layer.state_dict()


def test_cpu_float16_falls_back_to_the_reference_with_a_logged_reason(caplog):
    pw = random_packed(64, 128, 32)
    layer = QuantLinear.from_packed(pw, None, "awq")
    x = torch.randn(2, 128).half()
    path, why = dispatch.choose_path(x, layer)
    assert path == "reference" and "bfloat16" in why
    y = dispatch.linear(x.float(), layer)
    assert torch.equal(y, reference.linear(x.float(), layer))


def test_act_order_layer_falls_back_on_cpu_with_a_logged_reason(caplog):
    n, k, g = 64, 128, 32
    pw = random_packed(n, k, g, sym=True)
    pw.g_idx = (torch.randperm(k) // g).to(torch.int32)
    layer = QuantLinear.from_packed(pw, None, "gptq")
    x = torch.randn(3, k).bfloat16()
    with caplog.at_level(logging.WARNING, logger="quant.kernels.dispatch"):
        assert dispatch.choose_path(x, layer) == ("reference", "act-order g_idx")
        y = dispatch.linear(x, layer)
    assert "act-order g_idx" in caplog.text
    assert torch.equal(y, reference.linear(x, layer))


def test_cuda_kernel_choice_and_reasons():
    big = QuantLinear.from_packed(random_packed(256, 256, 128), None, "awq")
    assert dispatch.cuda_kernel_for(1, big) == ("w4a16_gemv", None)
    assert dispatch.cuda_kernel_for(32, big) == ("w4a16_gemv", None)
    assert dispatch.cuda_kernel_for(33, big) == ("w4a16_gemm", None)
    assert dispatch.cuda_kernel_for(dispatch.DEQUANT_MIN_M - 1, big) == ("w4a16_gemm", None)
    assert dispatch.cuda_kernel_for(dispatch.DEQUANT_MIN_M, big) == ("w4a16_dequant", None)
    odd_n = QuantLinear.from_packed(random_packed(96, 256, 64), None, "awq")
    assert dispatch.cuda_kernel_for(8, odd_n) == ("w4a16_gemv", None)
    assert dispatch.cuda_kernel_for(40, odd_n) == (None, "N=96 must be divisible by 128")
    assert dispatch.cuda_kernel_for(dispatch.DEQUANT_MIN_M, odd_n) == ("w4a16_dequant", None)  # N % 32 suffices
    odd_k = QuantLinear.from_packed(random_packed(128, 96, 32), None, "awq")
    assert dispatch.cuda_kernel_for(40, odd_k) == (None, "K=96 must be divisible by 64")
    small_n = QuantLinear.from_packed(random_packed(48, 64, 32), None, "awq")
    assert dispatch.cuda_kernel_for(1, small_n) == (None, "N=48 and K=64 must be divisible by 32")
    pw = random_packed(128, 128, 32, sym=True)
    pw.g_idx = (torch.randperm(128) // 32).to(torch.int32)
    act = QuantLinear.from_packed(pw, None, "gptq")
    assert dispatch.cuda_kernel_for(1, act) == (None, "act-order g_idx is not supported by the CUDA kernels")


def test_shape_checks_name_the_failed_constraint():
    assert ops.gemm_shape_check(64, 256, 576, 64) is None
    assert ops.gemm_shape_check(64, 256, 576, 128) == "K=576 must be divisible by group_size 128"
    assert ops.gemv_shape_check(33, 256, 256, 64) == "M=33 must be in [1, 32]"
    assert ops.gemv_shape_check(1, 256, 256, 48) == "group_size 48 must be a positive multiple of 32"


def test_kernel_layout_is_cached_and_not_in_the_state_dict():
    layer = QuantLinear.from_packed(random_packed(128, 128, 64), torch.randn(128).half(), "awq")
    kw, bias = dispatch.prepare_cuda(layer, torch.float16, torch.device("cpu"))
    again, _ = dispatch.prepare_cuda(layer, torch.float16, torch.device("cpu"))
    assert kw is again and bias.dtype == torch.float16
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "bias"}


def _buffer_bytes(layer) -> int:
    return sum(b.numel() * b.element_size() for b in layer.buffers() if not b.is_meta)


@pytest.mark.parametrize("fmt,g", [("awq", 64), ("gptq", 128), ("awq", -1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compact_layer_keeps_one_copy_and_rebuilds_its_checkpoint(fmt, g, dtype):
    n, k = 128, 256
    pw = random_packed(n, k, g, sym=(fmt == "gptq"))
    layer = QuantLinear.from_packed(pw, torch.randn(n).half(), fmt)
    want = {name: t.clone() for name, t in layer.state_dict().items()}
    x = torch.randn(3, k)
    y_before = reference.linear(x, layer)
    qweight_bytes = layer.qweight.numel() * 4
    before = _buffer_bytes(layer)

    assert layer.compact(dtype) and layer.compacted and not layer.compact(dtype)
    assert layer.qweight.is_meta and before - _buffer_bytes(layer) == qweight_bytes
    got = layer.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[name], want[name]) for name in want)
    assert torch.equal(reference.linear(x, layer), y_before)

    layer.to(torch.float32)  # the kernel copy moves and casts with the module, nothing is rebuilt
    assert layer.compacted and layer._kernel_copy().scales.dtype == torch.float32
    assert torch.equal(layer.state_dict()["qweight"], want["qweight"])


def test_compact_declines_layers_the_kernels_cannot_take():
    pw = random_packed(64, 128, 32, sym=True)
    pw.g_idx = (torch.randperm(128) // 32).to(torch.int32)
    act = QuantLinear.from_packed(pw, None, "gptq")
    assert not act.compact() and not act.qweight.is_meta
