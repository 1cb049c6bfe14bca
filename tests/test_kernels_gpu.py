"""GPU checks of the compiled W4A16 kernels against the pure-torch reference (skip without CUDA).

Reference: ``x.float() @ W.T`` in float32 (TF32 off), ``W = qmath.dequantize(q, s, z)`` in
float32 (exact: fp16 scale times a small integer). Tolerance on the relative Frobenius
error ||y - ref|| / ||ref||: fp16 2e-3 (weight and output each rounded to fp16,
2**-11 relative, fp32 accumulation), bf16 1e-2 (same with 2**-8, plus the bf16 scale).
Every case draws fresh random inputs; the output buffer is poisoned with NaN before
each launch (a freed NaN block of the same size, which the caching allocator hands
to the op's output) and every element must come back finite.

Needs the library built first: ``python -m quant.kernels.build --arch 90``.
"""
from __future__ import annotations

import pytest
import torch

from quant import qmath
from quant.formats import PackedWeight
from quant.kernels import dispatch, layout, loader, reference
from quant.modules import QuantLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

M_VALUES = (1, 2, 3, 4, 7, 8, 16, 17, 32, 64, 128, 256, 1024)
# (k, n) = (in_features, out_features) of real models' linears.
SHAPES = ((576, 1536), (896, 4864), (4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (8192, 28672))
GROUPS = (32, 64, 128, -1)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def compiled():
    torch.backends.cuda.matmul.allow_tf32 = False
    reason = loader.load_library()
    assert reason is None, f"compiled kernels not loaded: {reason}"
    assert loader.cuda_kernels_available()


def random_weight(n: int, k: int, group_size: int, sym: bool) -> PackedWeight:
    w = torch.randn(n, k, device="cuda") * 0.02
    scale, zero = qmath.compute_qparams(w, 4, group_size, sym)
    q = qmath.quantize(w, scale, zero, 4, group_size)
    return PackedWeight(q=q, scale=scale.half(), zero=zero.to(torch.int32), bits=4, group_size=group_size)


def poisoned_call(fn, m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    poison = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    del poison  # the op's output most likely reuses this block
    return fn()


def check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert y.dtype == dtype and y.shape == ref.shape, what
    assert torch.isfinite(y).all(), f"{what}: unwritten (NaN) or non-finite outputs"
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("k,n", SHAPES, ids=[f"k{k}_n{n}" for k, n in SHAPES])
@pytest.mark.parametrize("group_size", GROUPS, ids=[f"g{g}" for g in GROUPS])
def test_sweep(k, n, group_size):
    if group_size != -1 and k % group_size:
        pytest.skip(f"k={k} is not divisible by group_size {group_size}: no such checkpoint exists")
    for sym in (False, True) if group_size == 128 else (False,):
        pw = random_weight(n, k, group_size, sym)
        w_ref = pw.dequantize(torch.float32)  # [n, k]
        for dtype in (torch.float16, torch.bfloat16):
            kw = layout.repack(pw, dtype)
            assert (kw.zeros is None) == sym
            # The dequantized weight (large-M path) is the pure-torch reference's (run on the GPU), bit for bit,
            # every element written.
            wd = poisoned_call(lambda: torch.ops.qtool.w4a16_dequant(kw.qweight, kw.scales, kw.zeros, kw.group_size), n, k, dtype)
            want = reference.tile32_dequantize(kw.qweight, kw.scales, kw.zeros, kw.group_size)
            assert torch.equal(wd, want), f"w4a16_dequant k={k} n={n} g={group_size} sym={sym} {dtype}"
            del want
            for m in M_VALUES:
                x = torch.randn(m, k, device="cuda").to(dtype)
                ref = x.float() @ w_ref.T
                ops = ["w4a16_gemv", "w4a16_gemm"] if m <= 32 else ["w4a16_gemm"]
                for op in ops:
                    fn = getattr(torch.ops.qtool, op)
                    y = poisoned_call(lambda: fn(x, kw.qweight, kw.scales, kw.zeros, None, kw.group_size), m, n, dtype)
                    check(y, ref, dtype, f"{op} m={m} k={k} n={n} g={group_size} sym={sym} {dtype}")
                if m >= 64:
                    check(torch.nn.functional.linear(x, wd), ref, dtype, f"dequant+cuBLAS m={m} k={k} n={n} g={group_size}")
        torch.cuda.synchronize()


SPLITS = (1, 2, 3, 4, 8, 64)  # 64: more splits than a K of 576 has k32 tiles (18): empty splits add 0


@pytest.mark.parametrize("k,n", SHAPES, ids=[f"k{k}_n{n}" for k, n in SHAPES])
def test_split_k_gemv_matches_the_reference(k, n):
    """The split-K GEMV against the float32 reference for every M of the GEMV, group sizes 32/128/per channel,
    symmetric or not, both dtypes, 1 to 64 splits; with a bias; the output bit-identical on a second call
    (the partials are added in a fixed order), and the counters left at 0 after every call."""
    counters = torch.zeros(n // 32, dtype=torch.int32, device="cuda")
    for group_size, sym in ((128, False), (128, True), (32, False), (-1, False)):
        if group_size != -1 and k % group_size:
            continue
        pw = random_weight(n, k, group_size, sym)
        w_ref = pw.dequantize(torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            kw = layout.repack(pw, dtype)
            bias = torch.randn(n, device="cuda").to(dtype)
            for m in (1, 3, 8, 9, 16, 17, 32):
                x = torch.randn(m, k, device="cuda").to(dtype)
                ref = x.float() @ w_ref.T + bias.float()
                for splits in SPLITS:
                    call = lambda: torch.ops.qtool.w4a16_gemv_splitk(x, kw.qweight, kw.scales, kw.zeros, bias,  # noqa: E731
                                                                     kw.group_size, splits, counters)
                    y = poisoned_call(call, m, n, dtype)
                    what = f"gemv split-K {splits} m={m} k={k} n={n} g={group_size} sym={sym} {dtype}"
                    check(y, ref, dtype, what)
                    assert torch.equal(poisoned_call(call, m, n, dtype), y), f"{what}: not deterministic"
                    assert not counters.any(), f"{what}: counters not reset"
    torch.cuda.synchronize()


def test_split_k_gemv_refuses_bad_splits_and_counters():
    pw = random_weight(256, 256, 64, sym=False)
    kw = layout.repack(pw, torch.float16)
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    ok = torch.zeros(8, dtype=torch.int32, device="cuda")
    for splits in (0, 65):
        with pytest.raises(RuntimeError, match=f"splits={splits} must be in \\[1, 64\\]"):
            torch.ops.qtool.w4a16_gemv_splitk(x, kw.qweight, kw.scales, kw.zeros, None, 64, splits, ok)
    with pytest.raises(RuntimeError, match="counters must be int32"):
        torch.ops.qtool.w4a16_gemv_splitk(x, kw.qweight, kw.scales, kw.zeros, None, 64, 2, ok[:7])
    with pytest.raises(RuntimeError, match="counters has the wrong dtype"):
        torch.ops.qtool.w4a16_gemv_splitk(x, kw.qweight, kw.scales, kw.zeros, None, 64, 2, ok.long())


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantlinear_dispatches_to_the_kernels(fmt, dtype):
    n, k, g = 1536, 576, 64
    pw = random_weight(n, k, g, sym=(fmt == "gptq"))
    bias = torch.randn(n, device="cuda").half()
    cpu = PackedWeight(pw.q.cpu(), pw.scale.cpu(), pw.zero.clamp(min=1).cpu(), 4, g)  # v1 GPTQ: z >= 1
    pw = PackedWeight(cpu.q.cuda(), cpu.scale.cuda(), cpu.zero.cuda(), 4, g)
    layer = QuantLinear.from_packed(cpu, bias.cpu(), fmt).cuda()
    for shape in ((1, 1, k), (2, 5, k), (1, 64, k), (3, 100, k)):
        x = torch.randn(shape, device="cuda").to(dtype)
        path, why = dispatch.choose_path(x, layer)
        m = x.numel() // k
        assert path == ("cuda:w4a16_gemv" if m <= 32 else "cuda:w4a16_gemm" if m < dispatch.DEQUANT_MIN_M
                        else "cuda:w4a16_dequant"), (path, why)
        y = dispatch.linear(x, layer)
        ref = x.float() @ pw.dequantize(torch.float32).T + bias.float()
        check(y.reshape(-1, n), ref.reshape(-1, n), dtype, f"QuantLinear {fmt} {shape}")


def test_binding_names_the_failed_constraint():
    pw = random_weight(256, 256, 64, sym=False)
    kw = layout.repack(pw, torch.float16)
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="K=256 must be divisible by group_size 96"):
        torch.ops.qtool.w4a16_gemm(x, kw.qweight, kw.scales, None, None, 96)
    with pytest.raises(RuntimeError, match="M=33 must be in"):
        torch.ops.qtool.w4a16_gemv(torch.randn(33, 256, device="cuda", dtype=torch.float16), kw.qweight, kw.scales, kw.zeros, None, 64)
    with pytest.raises(RuntimeError, match="scales has the wrong dtype"):
        torch.ops.qtool.w4a16_gemm(x, kw.qweight, kw.scales.bfloat16(), kw.zeros, None, 64)
    with pytest.raises(RuntimeError, match="K=256 must be divisible by group_size 96"):
        torch.ops.qtool.w4a16_dequant(kw.qweight, kw.scales, None, 96)
    with pytest.raises(RuntimeError, match="zeros has the wrong dtype"):
        torch.ops.qtool.w4a16_dequant(kw.qweight, kw.scales, kw.zeros.int(), 64)


def test_runs_on_the_current_stream():
    pw = random_weight(4096, 4096, 128, sym=False)
    kw = layout.repack(pw, torch.float16)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = torch.ops.qtool.w4a16_gemv(x, kw.qweight, kw.scales, kw.zeros, None, 128)
    torch.cuda.current_stream().wait_stream(side)
    check(y, x.float() @ pw.dequantize(torch.float32).T, torch.float16, "side stream")


def _layer(n: int, k: int, g: int) -> QuantLinear:
    pw = random_weight(n, k, g, sym=False)
    cpu = PackedWeight(pw.q.cpu(), pw.scale.cpu(), pw.zero.cpu(), 4, g)
    return QuantLinear.from_packed(cpu, torch.randn(n).half(), "awq").cuda()


GRAPH_CASES = [(1, 4096, 4096, "w4a16_gemv"), (48, 4096, 4096, "w4a16_gemm"), (256, 4096, 4096, "w4a16_dequant"),
               (1, 1536, 8960, "w4a16_gemv_splitk"), (16, 4096, 14336, "w4a16_gemv_splitk")]


@pytest.mark.parametrize("m,n,k,op", GRAPH_CASES, ids=[f"{op}_m{m}" for m, n, k, op in GRAPH_CASES])
def test_cuda_graph_capture_and_replay(m, n, k, op):
    """Each path the dispatch takes, captured in a CUDA graph and replayed on fresh inputs, against the
    float32 reference (the split-K GEMV's counters and workspace inside the graph)."""
    layer = _layer(n, k, 128)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    assert dispatch.choose_path(x, layer) == ("cuda:" + op, None)
    dispatch.prepare_cuda(layer, x.dtype, x.device)  # repack before capture: nothing allocated inside
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(x)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    w_ref = layer.packed_weight().dequantize(torch.float32).cuda()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(y, x.float() @ w_ref.T + layer.bias.float(), torch.float16, f"graph replay {op} m={m}")
    assert not dispatch.splitk_counters(layer, x.device).any()


def test_split_k_dispatch_matches_the_plain_gemv():
    """A down projection at decode sizes goes through the split-K GEMV and gives what the plain GEMV gives
    (to float32 rounding of a different summation order), for both dtypes."""
    layer = _layer(896, 4864, 128)
    for dtype in (torch.float16, torch.bfloat16):
        kw, bias = dispatch.prepare_cuda(layer, dtype, torch.device("cuda"))
        for m in (1, 5, 16):
            x = torch.randn(2, m, 4864, device="cuda", dtype=dtype)[0]
            assert dispatch.choose_path(x, layer)[0] == "cuda:w4a16_gemv_splitk"
            plain = torch.ops.qtool.w4a16_gemv(x, kw.qweight, kw.scales, kw.zeros, bias, kw.group_size)
            check(layer(x), plain.float(), dtype, f"split-K dispatch m={m} {dtype}")


def test_torch_compile():
    layer = _layer(4096, 4096, 64)
    model = torch.nn.Sequential(layer, torch.nn.SiLU(), _layer(1024, 4096, 64))  # the last one split-K at m <= 16
    compiled = torch.compile(model)
    for m in (1, 8, 40, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        check(compiled(x), model(x).float(), torch.bfloat16, f"torch.compile m={m}")
