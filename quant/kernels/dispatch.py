"""The one place QuantLinear's compute path is chosen.

``linear(x, layer)`` takes, in order:

1. CUDA ``x`` and the compiled kernels loaded and the shape supported:
   ``qtool::w4a16_gemv`` (M <= 32; split over K, ``qtool::w4a16_gemv_splitk``, where
   :func:`gemv_splits` says it pays), ``qtool::w4a16_gemm`` (M < ``DEQUANT_MIN_M``), or, for
   larger M (prefill), ``qtool::w4a16_dequant`` then cuBLAS (``F.linear``), on the layer's
   tile32 copy (repacked once per dtype/device and cached in ``layer.kernel_cache``);
2. CPU bf16 ``x``, 4-bit, no act-order: torch's ``_weight_int4pack_mm_for_cpu``
   on a once-repacked copy;
3. otherwise the reference (:func:`quant.kernels.reference.linear`).

Each reason for leaving a fast path is logged once.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from quant import qmath
from quant.formats import PackedWeight
from quant.kernels import layout, loader, ops, reference

log = logging.getLogger(__name__)

CPU_INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts
# From this many rows of x on, dequantizing the weight once and calling cuBLAS beats the fused GEMM
# (H200, benchmarks/bench_gemm.py: see benchmarks/RESULTS.md).
DEQUANT_MIN_M = 64
# The split-K GEMV pays only at M <= 16 (H200, bench_gemm.py --splits; benchmarks/RESULTS.md, "Split-K GEMV").
SPLITK_MAX_M = 16


@functools.cache
def _log_fallback(path: str, reason: str) -> None:
    log.warning("W4A16 %s: reference path for some layers, because %s", path, reason)


def _cache(layer) -> dict:
    cache = getattr(layer, "kernel_cache", None)
    if cache is None:
        cache = {}
        layer.kernel_cache = cache  # a plain attribute: never part of the state_dict
    return cache


def _has_g_idx(layer) -> bool:
    """True for act-order weights. Checked once per layer and cached: comparing values on
    the device would synchronize, which a CUDA-graph capture forbids."""
    cache = _cache(layer)
    if "has_g_idx" not in cache:
        # GPTQ stores g_idx always; the natural order i // g means "no act-order".
        g_idx = getattr(layer, "g_idx", None)
        g = qmath.effective_group_size(layer.in_features, layer.group_size)
        natural = torch.arange(layer.in_features) // g
        cache["has_g_idx"] = g_idx is not None and not torch.equal(g_idx.cpu().long(), natural)
    return cache["has_g_idx"]


def gemv_splits(m: int, n: int, k: int, sms: int) -> int:
    """How many CTAs of the GEMV share each strip of 32 outputs, each over K / splits (1: no split), for
    ``x [m, k]`` times ``W^T [k, n]`` on a GPU with ``sms`` multiprocessors (0: split-K not considered).

    The GEMV gives each strip one CTA, so a layer with few strips and a long K (a down projection:
    N = 896-5120, K 2.7-5.8x N) leaves the SMs short of loads in flight; splitting K fixes that. Read off
    ``benchmarks/bench_gemm.py --splits 2 3 4 6 8`` on an H200 (132 SMs) over 14 shapes of real models
    (benchmarks/RESULTS.md, "Split-K GEMV"): split where K >= 2N and N/32 <= 1.25 x SMs, at M <= 16;
    8 CTAs a strip for at most 64 strips, else 4 (M <= 8) or 2. Everywhere else the split lost or won
    under 6%.
    """
    strips = n // 32
    if sms <= 0 or m > SPLITK_MAX_M or k < 2 * n or 4 * strips > 5 * sms:
        return 1
    if strips <= 64:
        return 8
    return 4 if m <= 8 else 2


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA ``device`` (cached); 0 for any other device."""
    if device.type != "cuda":
        return 0
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


def cuda_kernel_for(m: int, layer, dequant: bool = True, sms: int = 0) -> tuple[str | None, str | None]:
    """(op name, None) for the kernel that takes this call, or (None, why none does); ``dequant=False``
    leaves out dequantize + cuBLAS; ``sms`` (the GPU's multiprocessors; 0: leave it out) lets the
    split-K GEMV take the shapes :func:`gemv_splits` gives it."""
    n, k = layer.out_features, layer.in_features
    why = layout.layout_check(n, k, layer.bits, layer.group_size, _has_g_idx(layer))
    if why:
        return None, why
    g = qmath.effective_group_size(k, layer.group_size)
    if dequant and m >= DEQUANT_MIN_M and ops.dequant_shape_check(n, k, g) is None:
        return ops.DEQUANT_OP, None
    gemv_why = ops.gemv_shape_check(m, n, k, g)
    if gemv_why is None:
        return (ops.SPLITK_OP if gemv_splits(m, n, k, sms) > 1 else "w4a16_gemv"), None
    gemm_why = ops.gemm_shape_check(m, n, k, g)
    if gemm_why is None:
        return "w4a16_gemm", None
    return None, gemm_why if m > ops.GEMV_MAX_M else f"{gemv_why}; {gemm_why}"


def _device_key(device) -> str:
    """``"cuda"`` and ``"cuda:0"`` (the current device) name one cache entry."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def prepare_cuda(layer, dtype: torch.dtype, device: torch.device, packed: PackedWeight | None = None):
    """``(tile32 weight, bias)`` of the layer for ``dtype`` on ``device`` (built once, then cached).

    Call it before CUDA-graph capture so that nothing is allocated inside the captured region.
    ``packed`` (optional) is the layer's canonical weight when the caller already has it.
    """
    key = ("tile32", dtype, _device_key(device))
    cache = _cache(layer)
    if key not in cache:
        kw = layout.repack(packed if packed is not None else layer.packed_weight(), dtype)
        bias = None if layer.bias is None else layer.bias.to(device=device, dtype=dtype).contiguous()
        cache[key] = (
            layout.Tile32Weight(
                qweight=kw.qweight.to(device),
                scales=kw.scales.to(device),
                zeros=None if kw.zeros is None else kw.zeros.to(device),
                group_size=kw.group_size,
                out_features=kw.out_features,
                in_features=kw.in_features,
            ),
            bias,
        )
        if layer.out_features % 32 == 0:
            splitk_counters(layer, device)  # allocated here, before any graph capture
    return cache[key]


def splitk_counters(layer, device: torch.device) -> torch.Tensor:
    """The layer's zeroed int32 counters ``[N / 32]`` for ``qtool::w4a16_gemv_splitk`` on ``device``
    (made once and cached; every call leaves them 0). One set per layer, so layers never share one; a
    layer run on two streams at once would (nothing in qtool does that). ``prepare_cuda`` makes them
    before a CUDA-graph capture."""
    key = ("splitk_counters", _device_key(device))
    cache = _cache(layer)
    if key not in cache:
        cache[key] = torch.zeros(layer.out_features // 32, dtype=torch.int32, device=device)
    return cache[key]


def _cuda_linear(x: torch.Tensor, layer, op_name: str) -> torch.Tensor:
    kw, bias = prepare_cuda(layer, x.dtype, x.device)
    x2 = x.reshape(-1, layer.in_features).contiguous()
    if op_name == ops.SPLITK_OP:
        splits = gemv_splits(x2.shape[0], layer.out_features, layer.in_features, sm_count(x.device))
        y = torch.ops.qtool.w4a16_gemv_splitk(x2, kw.qweight, kw.scales, kw.zeros, bias, kw.group_size, splits,
                                              splitk_counters(layer, x.device))
    elif op_name == ops.DEQUANT_OP:
        y = F.linear(x2, torch.ops.qtool.w4a16_dequant(kw.qweight, kw.scales, kw.zeros, kw.group_size), bias)
    else:
        y = getattr(torch.ops.qtool, op_name)(x2, kw.qweight, kw.scales, kw.zeros, bias, kw.group_size)
    return y.reshape(*x.shape[:-1], layer.out_features)


def cpu_int4_check(layer) -> str | None:
    """Why torch's CPU int4 op cannot take this layer, or None."""
    if layer.bits != 4:
        return f"bits={layer.bits} (the CPU int4 op takes 4-bit weights)"
    if _has_g_idx(layer):
        return "act-order g_idx"
    if layer.out_features % 16:
        return f"N={layer.out_features} must be divisible by 16"
    g = qmath.effective_group_size(layer.in_features, layer.group_size)
    if g % 32:
        return f"group_size {g} must be a multiple of 32"
    return None


def prepare_cpu_int4(layer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed int4 weight, scales_and_zeros [K/g, N, 2] bf16, g) for ``_weight_int4pack_mm_for_cpu``, cached.

    That op computes ``(q - 8) * scale + zero``; ``(q - z) * s`` is the same with
    ``zero = (8 - z) * s``. Group sizes it does not take (e.g. per channel) are
    split into the largest accepted size dividing them, repeating the parameters.
    """
    cache = _cache(layer)
    if "cpu_int4" not in cache:
        pw = layer.packed_weight()
        g_full = qmath.effective_group_size(layer.in_features, pw.group_size)
        g = next(c for c in CPU_INT4_GROUPS if g_full % c == 0)
        scale = pw.scale.float().repeat_interleave(g_full // g, dim=1)  # [N, G] -> [N, K/g]
        zero = pw.zero.float().repeat_interleave(g_full // g, dim=1)
        sz = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(pw.q.cpu().to(torch.int32).contiguous(), 1)
        cache["cpu_int4"] = (packed, sz.to(torch.bfloat16), g)
    return cache["cpu_int4"]


def _cpu_int4_linear(x: torch.Tensor, layer) -> torch.Tensor:
    packed, sz, g = prepare_cpu_int4(layer)
    x2 = x.reshape(-1, layer.in_features).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, g, sz)
    if layer.bias is not None:
        y = y + layer.bias.to(torch.bfloat16)
    return y.reshape(*x.shape[:-1], layer.out_features)


def choose_path(x: torch.Tensor, layer) -> tuple[str, str | None]:
    """("cuda:<op>" | "cpu_int4" | "reference", reason the fast path was not taken or None)."""
    if x.is_cuda:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return "reference", f"dtype {x.dtype} (the CUDA kernels take float16 or bfloat16)"
        m = x.numel() // layer.in_features
        op_name, why = cuda_kernel_for(m, layer, sms=sm_count(x.device))
        if op_name is None:
            return "reference", why
        if not loader.cuda_kernels_available():
            return "reference", "the compiled kernels are not loaded"
        if op_name == ops.SPLITK_OP and not loader.has_cuda_kernel(op_name):  # an older library: the plain GEMV
            op_name = "w4a16_gemv"
        if op_name == ops.DEQUANT_OP and not loader.has_cuda_kernel(op_name):  # an older library: the fused GEMM
            op_name, why = cuda_kernel_for(m, layer, dequant=False)
            if op_name is None:
                return "reference", why
        return "cuda:" + op_name, None
    if x.device.type == "cpu":
        if x.dtype != torch.bfloat16:
            return "reference", f"dtype {x.dtype} (the CPU int4 op is fast for bfloat16 only)"
        why = cpu_int4_check(layer)
        return ("reference", why) if why else ("cpu_int4", None)
    return "reference", f"device {x.device.type}"


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``y = x @ W^T + bias`` for a QuantLinear ``layer``; picks compiled CUDA op, torch's CPU int4 op, or the reference."""
    path, why = choose_path(x, layer)
    if path.startswith("cuda:"):
        return _cuda_linear(x, layer, path.removeprefix("cuda:"))
    if path == "cpu_int4":
        return _cpu_int4_linear(x, layer)
    if why is not None and (x.is_cuda or x.dtype == torch.bfloat16):
        _log_fallback("on " + x.device.type, why)
    return reference.linear(x, layer)
