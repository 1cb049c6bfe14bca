"""Reference integer quantization: the one definition every fast path is tested against.

Conventions (shared by every format in ``quant.formats``):

* a weight is ``W[out, in]``; groups run along ``in``: ``group_size`` consecutive
  input features share one scale and one zero point per output row;
  ``group_size = -1`` means one group spanning all of ``in`` (per channel);
* ``q`` and ``zero`` are unsigned integers in ``[0, 2**bits)``;
* dequantization is ``w = (q - zero) * scale``;
* asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero = clamp(round(-min / scale))``;
* symmetric (the GPTQ convention): ``scale = 2 * max|w| / (2**bits - 1)`` and
  ``zero = 2**(bits - 1)``;
* scales are rounded to float16 *before* the codes are computed, because every
  checkpoint format stores them in float16: the packed layer then computes
  exactly what ``fake_quantize`` computes.

Shapes of the parameters: ``scale`` and ``zero`` are ``[out, n_groups]``.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
FP16_MAX = 65504.0  # float16's largest finite value: scales are stored in float16
FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)
FP16_OVERFLOW = 65520.0  # the least magnitude that float16 rounds to inf (half a step past FP16_MAX)


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension (``group_size=-1``: one)."""
    return 1 if group_size == -1 else in_features // group_size


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    # [out, in] -> [out, n_groups, g]
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    if in_f % g:
        raise ValueError(f"in_features {in_f} is not divisible by group_size {g}")
    return w.reshape(out_f, in_f // g, g)


def compute_qparams(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, clip: torch.Tensor | None = None, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per (row, group) of ``w[out, in]``.

    ``clip`` (optional, ``[out, n_groups]``) multiplies the range before the
    parameters are computed: the AWQ clipping search shrinks it below 1.
    ``min_zero`` keeps asymmetric zero points at or above it (1 for GPTQ v1
    checkpoints, whose loaders cannot read a zero point of 0).
    Returns ``(scale, zero)`` as float32 tensors ``[out, n_groups]``; ``zero``
    holds whole numbers.
    """
    maxq = 2**bits - 1
    wg = _grouped(w.float(), group_size)
    wmax = wg.amax(dim=-1)
    wmin = wg.amin(dim=-1)
    if sym:
        absmax = torch.maximum(wmax.abs(), wmin.abs())
        if clip is not None:
            absmax = absmax * clip
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        # The range always contains 0 so that exact zeros stay exact.
        wmax = wmax.clamp(min=0)
        wmin = wmin.clamp(max=0)
        if clip is not None:
            wmax, wmin = wmax * clip, wmin * clip
        scale = (wmax - wmin) / maxq
        zero = None
    # A constant-zero group would get scale 0; any positive scale reproduces it.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(max=FP16_MAX).half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, FP16_TINY))
    if zero is None:
        zero = torch.clamp(torch.round(-wmin / scale), min_zero, maxq)
    return scale, zero


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Integer codes ``q[out, in]`` (int32) of ``w`` under ``(scale, zero) [out, n_groups]``."""
    maxq = 2**bits - 1
    wg = _grouped(w.float(), group_size)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, maxq)
    return q.reshape(w.shape).to(torch.int32)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``w[out, in] = (q - zero) * scale``.

    Without ``g_idx`` input feature ``i`` belongs to group ``i // group_size``;
    with it (GPTQ act-order), to group ``g_idx[i]``.
    """
    if g_idx is not None:
        s = scale.float()[:, g_idx.long()]
        z = zero.float()[:, g_idx.long()]
        return ((q.float() - z) * s).to(dtype)
    # One float32 buffer, worked on in place: the same values as ``(q - z) * s``.
    w = q.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    _grouped(w, group_size).sub_(zero.float()[..., None]).mul_(scale.float()[..., None])
    return w.to(dtype)


def fake_quantize(
    w: torch.Tensor, bits: int, group_size: int, sym: bool = False, clip: torch.Tensor | None = None, min_zero: int = 0
) -> torch.Tensor:
    """Quantize then dequantize, in ``w``'s dtype: what the packed layer will compute with."""
    scale, zero = compute_qparams(w, bits, group_size, sym, clip, min_zero)
    q = quantize(w, scale, zero, bits, group_size)
    return dequantize(q, scale, zero, group_size, dtype=w.dtype)
