"""The pure-torch W4A16 reference: the one definition every fast path is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.kernels import layout


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``x @ W^T + bias`` with ``W`` dequantized from a QuantLinear's checkpoint tensors (``qmath.dequantize``)."""
    w = layer.packed_weight().dequantize(x.dtype).to(x.device)
    bias = None if layer.bias is None else layer.bias.to(device=x.device, dtype=x.dtype)
    return F.linear(x, w, bias)


def tile32_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """The same function on the kernels' tile32 tensors: unpack to canonical codes, then ``qmath.dequantize``."""
    return F.linear(x, tile32_dequantize(qweight, scales, zeros, group_size).to(x.dtype), bias)


def tile32_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``W [N, K]`` in the scales' dtype from the tile32 tensors (``layout.unpack``, then ``qmath.dequantize``)."""
    n, k = qweight.shape[1] * layout.TILE, qweight.shape[0] * layout.TILE
    kw = layout.Tile32Weight(qweight, scales, zeros, group_size, n, k)
    return layout.unpack(kw).dequantize(scales.dtype)
