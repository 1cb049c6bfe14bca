"""The ``qtool::`` custom ops: schemas, fake (meta) kernels and CPU kernels, all in Python.

The compiled library (``csrc/``, loaded by :mod:`quant.kernels.loader` only)
adds the CUDA kernels to these same ops. Both ops compute
``y[M, N] = x[M, K] @ W^T + bias`` on the tile32 layout (:mod:`quant.kernels.layout`):

* ``qtool::w4a16_gemv``: small batch, ``M <= 32``, ``N % 32 == 0``, ``K % 32 == 0``;
* ``qtool::w4a16_gemm``: any ``M``, ``N % 128 == 0``, ``K % 64 == 0``;
* both: ``group_size`` a multiple of 32 dividing ``K`` (per channel: ``K``);
  fp16 or bf16 ``x``, ``scales`` and ``bias`` of ``x``'s dtype, uint8 ``zeros`` or none (z = 8).

``qtool::w4a16_dequant(qweight, scales, zeros, group_size)`` returns ``W [N, K]`` in the scales'
dtype, bit-identical to the weights the two fused ops multiply by (for a cuBLAS matmul at large M).

``qtool::w4a16_gemv_splitk(x, qweight, scales, zeros, bias, group_size, splits, counters)`` is
``w4a16_gemv`` with K split over ``splits`` (1..64) CTAs per 32 outputs, the partial sums added
in a fixed order by the last CTA of each strip; ``counters`` (int32 ``[>= N/32]``, all 0, not shared
with a launch that may run at the same time: :func:`quant.kernels.dispatch.splitk_counters` keeps
one set per layer) is left all 0. The dispatch picks it where :func:`quant.kernels.dispatch.gemv_splits`
says it beats ``w4a16_gemv``.
"""
from __future__ import annotations

import torch

from quant.kernels import reference

GEMV_MAX_M = 32
_SCHEMA = "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int group_size) -> Tensor"
OP_NAMES = ("w4a16_gemv", "w4a16_gemm")

_lib = torch.library.Library("qtool", "FRAGMENT")
for _name in OP_NAMES:
    _lib.define(_name + _SCHEMA)


def check_operands(op: str, x, qweight, scales, zeros, bias, group_size: int) -> None:
    """The CUDA binding's shape refusals (csrc/binding.cpp: x [M, K], qweight int32 [K/32, N/32, 32, 4],
    scales and zeros [K/group_size, N], bias [N], then the kernel's own shape check), made by the CPU and fake
    kernels too, so that code tried on the CPU or traced fails as it would on a GPU. Raises ValueError naming
    the operand; dtypes, devices and alignment stay the binding's alone (the CPU kernels take float32 too)."""
    if x.dim() != 2:
        raise ValueError(f"qtool: {op}: x must be 2-D [M, K], got {x.dim()} dims")
    m, k = x.shape
    n = _check_weight(op, qweight, scales, zeros, group_size)
    if qweight.shape[0] * 32 != k:
        raise ValueError(f"qtool: {op}: qweight covers K={qweight.shape[0] * 32} but x has K={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"qtool: {op}: bias must be [N] with N={n}, got {list(bias.shape)}")
    why = (gemm_shape_check if op == "w4a16_gemm" else gemv_shape_check)(m, n, k, group_size)
    if why:
        raise ValueError(f"qtool: {op}: {why}")


def _check_weight(op: str, qweight, scales, zeros, group_size: int) -> int:
    """The binding's ``check_weight``: qweight int32 [K/32, N/32, 32, 4], not empty, a positive group size dividing
    K, scales and zeros [K/group_size, N]. Returns N."""
    if qweight.dtype != torch.int32 or qweight.dim() != 4 or tuple(qweight.shape[2:]) != (32, 4):
        raise ValueError(f"qtool: {op}: qweight must be int32 [K/32, N/32, 32, 4] (the qtool-tile32 layout), got "
                         f"{qweight.dtype} {list(qweight.shape)}")
    k, n = qweight.shape[0] * 32, qweight.shape[1] * 32
    if n == 0 or k == 0:
        raise ValueError(f"qtool: {op}: empty weight (N={n}, K={k})")
    if group_size <= 0:
        raise ValueError(f"qtool: {op}: group_size must be positive (per channel: pass K), got {group_size}")
    if k % group_size:
        raise ValueError(f"qtool: {op}: K={k} must be divisible by group_size {group_size}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and tuple(t.shape) != (k // group_size, n):
            raise ValueError(f"qtool: {op}: {name} must be [K/group_size, N] = [{k // group_size}, {n}], got "
                             f"{list(t.shape)}")
    return n


def _fake_for(op: str):
    def fake(x, qweight, scales, zeros, bias, group_size, *splitk):  # splitk: (splits, counters) of the split-K op
        check_operands(op, x, qweight, scales, zeros, bias, group_size)
        if splitk:
            _check_splitk(qweight, *splitk)
        return x.new_empty((x.shape[0], qweight.shape[1] * 32))  # [M, K] -> [M, N]
    return fake


def _cpu_for(op: str):
    def cpu(x, qweight, scales, zeros, bias, group_size, *splitk):  # the reference whatever the split count
        check_operands(op, x, qweight, scales, zeros, bias, group_size)
        if splitk:
            _check_splitk(qweight, *splitk)
        return reference.tile32_linear(x, qweight, scales, zeros, bias, group_size)
    return cpu


for _name in OP_NAMES:
    torch.library.register_fake(f"qtool::{_name}", _fake_for(_name), lib=_lib)
    _lib.impl(_name, _cpu_for(_name), "CPU")

SPLITK_OP = "w4a16_gemv_splitk"
GEMV_MAX_SPLITS = 64
_lib.define(SPLITK_OP + _SCHEMA.replace(") ->", ", int splits, Tensor(a!) counters) ->"))


def _check_splitk(qweight, splits, counters) -> None:
    """The CUDA binding's refusals of ``splits`` and ``counters``, on every device: code tried on the CPU
    fails there as it would on a GPU."""
    if not 1 <= splits <= GEMV_MAX_SPLITS:
        raise ValueError(f"qtool: w4a16_gemv_splitk: splits={splits} must be in [1, {GEMV_MAX_SPLITS}]")
    n_strips = qweight.shape[1]
    if counters.dtype != torch.int32 or counters.dim() != 1 or counters.shape[0] < n_strips:
        raise ValueError(f"qtool: {SPLITK_OP}: counters must be int32 [>= N/32] = [{n_strips}], all 0; got {counters.dtype} "
                         f"{list(counters.shape)}")


torch.library.register_fake(f"qtool::{SPLITK_OP}", _fake_for(SPLITK_OP), lib=_lib)  # operands, then counters
_lib.impl(SPLITK_OP, _cpu_for(SPLITK_OP), "CPU")


DEQUANT_OP = "w4a16_dequant"
_lib.define(DEQUANT_OP + "(Tensor qweight, Tensor scales, Tensor? zeros, int group_size) -> Tensor")


def _check_dequant(qweight, scales, zeros, group_size) -> None:
    n = _check_weight(DEQUANT_OP, qweight, scales, zeros, group_size)
    why = dequant_shape_check(n, qweight.shape[0] * 32, group_size)
    if why:
        raise ValueError(f"qtool: {DEQUANT_OP}: {why}")


def _fake_dequant(qweight, scales, zeros, group_size):
    _check_dequant(qweight, scales, zeros, group_size)
    return scales.new_empty((qweight.shape[1] * 32, qweight.shape[0] * 32))


def _cpu_dequant(qweight, scales, zeros, group_size):
    _check_dequant(qweight, scales, zeros, group_size)
    return reference.tile32_dequantize(qweight, scales, zeros, group_size)


torch.library.register_fake("qtool::w4a16_dequant", _fake_dequant, lib=_lib)
_lib.impl("w4a16_dequant", _cpu_dequant, "CPU")


def dequant_shape_check(n: int, k: int, group_size: int) -> str | None:
    """Mirror of ``dequant_check`` in csrc/w4a16_dequant.cu."""
    if n % 32 or k % 32:
        return f"N={n} and K={k} must be divisible by 32"
    return _group_check(k, group_size)


def gemm_shape_check(m: int, n: int, k: int, group_size: int) -> str | None:
    """Mirror of ``gemm_check`` in csrc/w4a16_gemm.cu: None, or the constraint that failed."""
    if m < 1:
        return f"M={m} must be at least 1"
    if n % 128:
        return f"N={n} must be divisible by 128"
    if k % 64:
        return f"K={k} must be divisible by 64"
    return _group_check(k, group_size)


def gemv_shape_check(m: int, n: int, k: int, group_size: int) -> str | None:
    """Mirror of ``gemv_check`` in csrc/w4a16_gemv.cu."""
    if not 1 <= m <= GEMV_MAX_M:
        return f"M={m} must be in [1, {GEMV_MAX_M}]"
    return dequant_shape_check(n, k, group_size)


def _group_check(k: int, group_size: int) -> str | None:
    if group_size <= 0 or group_size % 32:
        return f"group_size {group_size} must be a positive multiple of 32"
    if k % group_size:
        return f"K={k} must be divisible by group_size {group_size}"
    return None
