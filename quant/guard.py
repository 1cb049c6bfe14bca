"""Never worse than round-to-nearest: each block's result is checked on windows no method saw.

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
"""
from __future__ import annotations

import copy
import logging

import torch

from calib.runner import run_calls
from quant import rtn
from quant.methods import BlockContext, BlockQuantizer, BlockResult

log = logging.getLogger(__name__)

FALLBACK_KEY = "kept"  # info column: which block was kept, the method's or "rtn"


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
    ``kept``; ``BlockResult.block`` is the RTN block where it was kept.
    """

    def guarded(ctx: BlockContext) -> BlockResult:
        if ctx.inputs is None or not ctx.inputs.guard:
            return method(ctx)
        calls = ctx.inputs.guard
        fp_block = copy.deepcopy(ctx.block)
        refs = run_calls(ctx.block, calls)
        result = method(ctx)
        err = relative_error(run_calls(ctx.block, calls), refs)
        rtn.quantize_block(BlockContext(ctx.index, fp_block, ctx.names, ctx.cfg, ctx.arch, None))
        err_rtn = relative_error(run_calls(fp_block, calls), refs)
        if not err <= err_rtn:  # NaN from the method also falls back
            log.info("block %d: round-to-nearest is closer to the full-precision block on held-out windows "
                     "(%.3g against %.3g for %s): keeping RTN", ctx.index, err_rtn, err, ctx.cfg.method)
            result = BlockResult(info=dict(result.info), artifacts={}, block=fp_block)
        result.info.update({"held-out err": f"{err:.3e}", "rtn held-out err": f"{err_rtn:.3e}",
                            FALLBACK_KEY: "rtn" if result.block is not None else ctx.cfg.method})
        return result

    return guarded
