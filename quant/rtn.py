"""Round-to-nearest: the baseline. Each weight group gets min/max parameters, no data needed."""
from __future__ import annotations

from quant.layers import replace_linear, rtn_packed
from quant.methods import BlockContext, BlockResult


def quantize_block(ctx: BlockContext) -> BlockResult:
    for name in ctx.names:
        lin = ctx.block.get_submodule(name)
        replace_linear(ctx.block, name, rtn_packed(lin.weight, ctx.cfg), ctx.cfg)
    return BlockResult()
