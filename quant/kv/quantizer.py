"""Reference KV-cache quantization: the one definition the cache and the CUDA kernels are tested against.

Tensors are laid out as the cache holds them: ``x[batch, kv_heads, tokens, head_dim]``.

Schemes (``bits`` is 8 or 4; codes are unsigned, dequantization is ``x = (q - zero) * scale``):

* **per token** (keys or values, online, no calibration): one group per (batch, head, token),
  spanning ``head_dim``. ``scale = (max - min) / (2**bits - 1)`` over the group, with the range
  widened to contain 0 so that the integer zero point ``zero = round(-min / scale)`` lies in
  ``[0, 2**bits - 1]``. ``scale`` is rounded to float16 *before* the codes are computed (it is
  stored in float16), ``zero`` is stored as uint8.
  Storage per group: ``head_dim * bits / 8`` code bytes + 2 (scale) + 1 (zero).
* **per channel** (keys, calibrated, static): one (scale, zero) per (layer, head, channel),
  derived from the channel's calibrated ``[min, max]`` (:func:`channel_qparams`); float32 and
  fractional ``zero`` (they are stored once per layer, not per token). Values outside the
  range are clamped here; the cache (:mod:`quant.kv.cache`) widens the range first, so that no
  key is. Storage per token: the codes only.

Codes layout (``pack_int4_u8``): int8 codes are ``uint8[..., head_dim]``; int4 codes are packed
two per byte along ``head_dim``: byte ``j`` holds code ``2j`` in its low nibble and ``2j + 1`` in
its high nibble, ``uint8[..., head_dim / 2]``.
"""
from __future__ import annotations

import torch

from quant.qmath import FP16_MAX, FP16_TINY

KV_BITS = (4, 8)


def check_bits(bits: int) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"KV cache bits {bits!r} are not supported; use 8 or 4")


def pack_int4_u8(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16) ``[..., d]`` -> packed ``[..., d / 2]`` (low nibble = even index)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4_u8(p: torch.Tensor) -> torch.Tensor:
    """Packed ``[..., d / 2]`` -> uint8 codes ``[..., d]``."""
    lo, hi = p & 0x0F, p >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _store_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    q = q.to(torch.uint8)
    return pack_int4_u8(q) if bits == 4 else q


def _load_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4_u8(codes) if bits == 4 else codes


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization with one group per row of ``x[..., head_dim]``.

    Returns ``(codes uint8 [..., head_dim * bits / 8], scale float16 [..., 1], zero uint8 [..., 1])``.
    """
    check_bits(bits)
    maxq = 2**bits - 1
    xf = x.float()
    xmax = xf.amax(dim=-1, keepdim=True).clamp(min=0)
    xmin = xf.amin(dim=-1, keepdim=True).clamp(max=0)
    # Divide by a tensor, not a Python number: on CUDA torch turns division by a CPU scalar into a
    # multiplication by its reciprocal, which rounds differently (the kernel and the CPU divide exactly).
    scale = ((xmax - xmin) / torch.full_like(xmax, maxq)).clamp(max=FP16_MAX).half().float()
    # A constant-zero group gets scale 0; any positive scale reproduces it.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, FP16_TINY))
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    q = torch.round(xf / scale + zero).clamp(0, maxq)
    return _store_codes(q, bits), scale.half(), zero.to(torch.uint8)


def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_per_token`: ``(q - zero) * scale`` in ``dtype``."""
    q = _load_codes(codes, bits).float()
    return ((q - zero.float()) * scale.float()).to(dtype)


def channel_qparams(cmin: torch.Tensor, cmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Static per-channel ``(scale, zero)`` (float32, ``[heads, head_dim]``) from a calibrated range."""
    check_bits(bits)
    maxq = 2**bits - 1
    cmin, cmax = cmin.float(), cmax.float()
    scale = (cmax - cmin) / maxq
    scale = torch.where(scale > 0, scale, torch.full_like(scale, FP16_TINY))
    zero = -cmin / scale
    return scale, zero


def quantize_per_channel(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``x[batch, heads, tokens, head_dim]`` with static ``scale, zero [heads, head_dim]``."""
    check_bits(bits)
    maxq = 2**bits - 1
    s, z = scale[:, None, :], zero[:, None, :]  # [heads, 1, head_dim] broadcasts over batch and tokens
    q = torch.round(x.float() / s + z).clamp(0, maxq)
    return _store_codes(q, bits)


def dequantize_per_channel(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_per_channel`."""
    q = _load_codes(codes, bits).float()
    return ((q - zero[:, None, :]) * scale[:, None, :]).to(dtype)


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize(quantize(x))`` per token, in ``x``'s dtype."""
    return dequantize_per_token(*quantize_per_token(x, bits), bits, x.dtype)


def bytes_per_token_per_head(head_dim: int, bits: int, per_token_params: bool) -> float:
    """Stored bytes for one token of one head: codes, plus float16 scale and uint8 zero if per token."""
    return head_dim * bits / 8 + (3 if per_token_params else 0)
