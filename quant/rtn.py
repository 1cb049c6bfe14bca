"""Round-to-nearest: the baseline. Each weight group gets min/max parameters, no data needed."""
from __future__ import annotations

from quant.layers import rtn_packed, set_quantized
from quant.methods import BlockContext, BlockResult


def quantize_block(ctx: BlockContext) -> BlockResult:
    packed = {name: set_quantized(ctx.block, name, rtn_packed(ctx.block.get_submodule(name).weight, ctx.cfg))
              for name in ctx.names}
    return BlockResult(packed=packed)
