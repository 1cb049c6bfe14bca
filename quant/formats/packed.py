"""The canonical, format-independent form of one quantized linear weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quant import qmath


@dataclass
class PackedWeight:
    """Integer codes and their parameters, before packing into a checkpoint layout.

    * ``q``: uint8 ``[out, in]``, values in ``[0, 2**bits)`` (given in any integer dtype, stored as uint8:
      a block's codes are held until it is packed, and int32 codes would take as much memory as its
      float32 weights);
    * ``scale``: ``[out, G]`` (float16 in every format); ``zero``: integer ``[out, G]``;
    * ``g_idx``: int32 ``[in]``, the group of each input feature, or ``None`` for the
      natural order ``i // group_size``.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def __post_init__(self):
        if self.bits > 8:
            raise ValueError(f"{self.bits}-bit codes are not supported; qtool quantizes to 2 to 8 bits")
        if self.q.dtype != torch.uint8:
            if self.q.numel() and (int(self.q.min()) < 0 or int(self.q.max()) >= 2**self.bits):
                raise ValueError(f"codes outside [0, {2**self.bits}) cannot be {self.bits}-bit codes")
            self.q = self.q.to(torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return qmath.dequantize(self.q, self.scale, self.zero, self.group_size, self.g_idx, dtype)

    def to(self, device) -> PackedWeight:
        """The same weight with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(move(self.q), move(self.scale), move(self.zero), self.bits, self.group_size,
                            move(self.g_idx))

    def rows(self, r0: int, r1: int) -> PackedWeight:
        """Output rows ``r0..r1`` (copies): one linear out of linears solved as one stacked matrix."""
        return PackedWeight(self.q[r0:r1].clone(), self.scale[r0:r1].clone(), self.zero[r0:r1].clone(),
                            self.bits, self.group_size, self.g_idx)
