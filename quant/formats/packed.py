"""The canonical, format-independent form of one quantized linear weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quant import qmath


@dataclass
class PackedWeight:
    """Integer codes and their parameters, before packing into a checkpoint layout.

    * ``q``: int32 ``[out, in]``, values in ``[0, 2**bits)``;
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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return qmath.dequantize(self.q, self.scale, self.zero, self.group_size, self.g_idx, dtype)

    def to(self, device) -> PackedWeight:
        """The same weight with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(move(self.q), move(self.scale), move(self.zero), self.bits, self.group_size,
                            move(self.g_idx))
