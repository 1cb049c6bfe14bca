"""The pure-torch W4A16 reference: dequantize, then an ordinary matmul. Every fast path is tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    w = layer.packed_weight().dequantize(x.dtype).to(x.device)
    bias = None if layer.bias is None else layer.bias.to(device=x.device, dtype=x.dtype)
    return F.linear(x, w, bias)
