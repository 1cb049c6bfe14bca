"""Never worse than round-to-nearest, block by block: each block's result is checked on windows no method saw.

A data-aware method (AWQ, GPTQ, AWQ+GPTQ) chooses on the calibration windows it
searches on, through a proxy (a closed-form error, a Hessian). Neither guarantees
that the block computes closer to the full-precision block than plain RTN does.
:func:`rtn_guard` wraps a method: before it runs, the block is copied; after, the
block's output on the *guard* windows (held out of every search,
:class:`calib.runner.BlockInputs`) is compared with the full-precision output, and
so is the RTN-quantized copy's. Where RTN is closer, the RTN block is kept and the
method's search results for that block are dropped (so a replay gives RTN there).

The error is what the next block sees: every decoder block reads the residual
stream through a norm, so a token's error counts relative to the size of its hidden
state (:func:`token_weights`). Attention-sink tokens, whose hidden states are
hundreds of times larger than the others', would otherwise decide alone.

A block closer to its full-precision self can still make the *model* worse; the
guard also hands each block's RTN version (and the one-module candidates) to the
whole-model check, :mod:`quant.model_check`.
"""
from __future__ import annotations

import copy
import logging

import torch

from calib.runner import run_calls
from quant import heap, rtn
from quant.layers import to_quant_linears
from quant.methods import BlockContext, BlockQuantizer, BlockResult
from quant.model_check import PARTIAL_BASE, partial_blocks

log = logging.getLogger(__name__)

FALLBACK_KEY = "kept"  # info column: whose block the checkpoint holds: the method's label, "rtn" (its guard kept
# RTN), or, where the whole-model check kept another model, "<its block's model> (whole model[: <the kept model>])"


def token_weights(hidden: torch.Tensor) -> torch.Tensor:
    """``1 / ‖h_t‖²`` per token of ``hidden [..., d]`` (float32, shape ``[...]``): an error ``e_t`` added
    to the residual stream reaches the next norm as ``e_t / rms(h_t)``."""
    return 1.0 / hidden.float().pow(2).sum(-1).clamp(min=1e-12)


def relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """Mean over tokens of ``‖out_t - ref_t‖² / ‖ref_t‖²`` (outputs ``[b, t, d]``, one per call)."""
    total, n = 0.0, 0
    for out, ref in zip(outs, refs):
        d = (out.float() - ref.float()).pow(2).sum(-1)
        total += float((d * token_weights(ref)).sum())
        n += d.numel()
    return total / max(n, 1)


def rtn_guard(method: BlockQuantizer) -> BlockQuantizer:
    """``method`` with the RTN guard: the block is replaced by its RTN version where that is closer
    to the full-precision block on ``ctx.inputs.guard``. Without guard windows, ``method`` as is.

    The result's ``info`` gains ``held-out err`` (the method's), ``rtn held-out err`` and
    ``kept``; ``BlockResult.block`` is the RTN block (packed) where it was kept, and the RTN block is the
    ``"rtn"`` alternative (the all-RTN model of the whole-model check) either way.
    """

    def guarded(ctx: BlockContext) -> BlockResult:
        if ctx.inputs is None or not ctx.inputs.guard:
            return method(ctx)
        calls = ctx.inputs.guard
        refs = run_calls(ctx.block, calls)
        # RTN's version first, packed as soon as its outputs are known: while the method runs, only the
        # method's block is held dense (a second dense copy of a large block is gigabytes).
        rtn_block = copy.deepcopy(ctx.block)
        rtn_packed = rtn.quantize_block(BlockContext(ctx.index, rtn_block, ctx.names, ctx.cfg, ctx.arch, None)).packed
        rtn_outs = run_calls(rtn_block, calls)
        err_rtn = relative_error(rtn_outs, refs)
        to_quant_linears(rtn_block, rtn_packed, ctx.cfg.format)
        del rtn_packed
        heap.trim()  # the float32 copy RTN rounded is gone: its pages back before the method's search
        result = method(ctx)
        outs = run_calls(ctx.block, calls)
        err = relative_error(outs, refs)
        # The next block's inputs on these windows are the kept block's outputs: computed already.
        ctx.inputs.remember(ctx.block if err <= err_rtn else rtn_block, calls, outs if err <= err_rtn else rtn_outs)
        if not err <= err_rtn:  # NaN from the method also falls back
            log.info("block %d: round-to-nearest is closer to the full-precision block on held-out windows "
                     "(%.3g against %.3g for %s): keeping RTN", ctx.index, err_rtn, err, ctx.cfg.label)
            result = BlockResult(info=dict(result.info), artifacts={}, block=rtn_block,
                                 alternatives=result.alternatives)
        base = {**result.alternatives, "rtn": rtn_block}.get(PARTIAL_BASE.get(ctx.cfg.label, ""))
        if base is not None:  # AWQ in one module: AWQ's with RTN, AWQ+GPTQ's with plain GPTQ (issue 20)
            result.alternatives.update(partial_blocks(ctx, result, base, rtn_block))
        result.alternatives["rtn"] = rtn_block
        result.info.update({"held-out err": f"{err:.3e}", "rtn held-out err": f"{err_rtn:.3e}",
                            FALLBACK_KEY: "rtn" if result.block is not None else ctx.cfg.label})
        return result

    return guarded
