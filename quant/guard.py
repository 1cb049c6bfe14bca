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

A block that is closer to its full-precision self can still make the *model* worse:
errors that each block keeps small add up along the residual stream in directions no
per-block measure weighs. So the pipeline also checks the whole model
(:func:`held_out_nll`): the next-token loss on the guard windows of the model as
quantized against each alternative whole model (the all-RTN model, from each block's
RTN version that the guard keeps; for AWQ+GPTQ also plain GPTQ, without AWQ's scales),
and keeps the lowest.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from calib.collectors import BlockCall, record_block_calls
from calib.runner import move, run_calls
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
    ``kept``; ``BlockResult.block`` is the RTN block where it was kept, and the RTN block is the
    ``"rtn"`` alternative (the all-RTN model of the whole-model check) either way.
    """

    def guarded(ctx: BlockContext) -> BlockResult:
        if ctx.inputs is None or not ctx.inputs.guard:
            return method(ctx)
        calls = ctx.inputs.guard
        fp_block = copy.deepcopy(ctx.block)
        refs = run_calls(ctx.block, calls)
        result = method(ctx)
        err = relative_error(run_calls(ctx.block, calls), refs)
        rtn_result = rtn.quantize_block(BlockContext(ctx.index, fp_block, ctx.names, ctx.cfg, ctx.arch, None))
        err_rtn = relative_error(run_calls(fp_block, calls), refs)
        if not err <= err_rtn:  # NaN from the method also falls back
            log.info("block %d: round-to-nearest is closer to the full-precision block on held-out windows "
                     "(%.3g against %.3g for %s): keeping RTN", ctx.index, err_rtn, err, ctx.cfg.label)
            result = BlockResult(packed=rtn_result.packed, info=dict(result.info), artifacts={}, block=fp_block,
                                 alternatives=result.alternatives)
        result.alternatives["rtn"] = (fp_block, rtn_result.packed)
        result.info.update({"held-out err": f"{err:.3e}", "rtn held-out err": f"{err_rtn:.3e}",
                            FALLBACK_KEY: "rtn" if result.block is not None else ctx.cfg.label})
        return result

    return guarded


def held_out_nll(model: nn.Module, blocks: nn.ModuleList, block_list: list[nn.Module], input_ids: torch.Tensor,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 2) -> float:
    """Mean next-token negative log-likelihood (nats per token) of ``model`` on ``input_ids [n, seq]`` with its
    decoder blocks replaced by ``block_list`` (same length as ``blocks``; the model itself is not changed).

    The blocks run one at a time on ``device`` in ``dtype`` (as in calibration); the embeddings, the final
    norm and the head are the model's own (its forward, with the blocks passing precomputed hidden states
    through), so logit soft-capping and tied embeddings are handled as the model does.
    """
    batches = list(input_ids.split(batch_size))
    per_batch = [record_block_calls(model, blocks, ids) for ids in batches]
    hidden = [move(calls[0].hidden, device, dtype) for calls in per_batch]
    for i, block in enumerate(block_list):
        # Only the block's own float tensors (norms, unquantized linears) take the compute dtype, and are put
        # back as they were, not cast back (a bf16 round trip loses bits); QuantLinear scales are never cast.
        cast = _cast_to_compute(block)
        originals = [t.data for _, t in cast]
        try:
            for _, t in cast:
                t.data = t.data.to(device=device, dtype=dtype)
            block.to(device=device)
            hidden = run_calls(block, [BlockCall(h, move(c[i].args, device, dtype), move(c[i].kwargs, device, dtype))
                                       for h, c in zip(hidden, per_batch)])
        finally:
            block.to(device="cpu")
            for (_, t), data in zip(cast, originals):
                t.data = data
    return final_nll(model, blocks, batches, hidden)


def final_nll(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], finals: list[torch.Tensor]) -> float:
    """Mean next-token NLL (nats per token) of ``model`` on the windows ``batches`` (``[b, seq]`` token ids each)
    when its last decoder block outputs ``finals`` (``[b, seq, hidden]`` each): :func:`window_nlls` averaged
    over the windows (all of one length)."""
    nll = window_nlls(model, blocks, batches, finals)
    return sum(nll) / max(len(nll), 1)


def window_nlls(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor],
                finals: list[torch.Tensor]) -> list[float]:
    """Each window's mean next-token NLL (nats per token), in order, for the windows ``batches`` (``[b, seq]``
    token ids each) when the model's last decoder block outputs ``finals`` (``[b, seq, hidden]`` each): the
    model's own final norm and head (its forward with every block bypassed), one window at a time. Works
    with the blocks on the meta device (they are never run)."""
    out = []
    for ids_b, h_b in zip(batches, finals, strict=True):
        for ids, h in zip(ids_b.split(1), h_b.split(1)):  # one window at a time: [seq, vocab] logits are large
            logits = _logits_from_final_hidden(model, blocks, ids, h)
            out.append(float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device))))
            del logits
    return out


def _cast_to_compute(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The block's floating tensors outside its QuantLinears (whose packed tensors and scales keep their dtype)."""
    from quant.modules import QuantLinear

    quantized = {name for name, m in block.named_modules() if isinstance(m, QuantLinear)}
    return [(n, t) for n, t in [*block.named_parameters(), *block.named_buffers()]
            if t.is_floating_point() and n.rsplit(".", 1)[0] not in quantized]


def _logits_from_final_hidden(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, final: torch.Tensor):
    """The model's logits for ``ids`` when its last block outputs ``final`` (every block bypassed)."""
    last = len(blocks) - 1

    def through(i):
        def forward(hidden, *args, **kwargs):
            return final.to(device=hidden.device, dtype=hidden.dtype) if i == last else hidden
        return forward

    for i, block in enumerate(blocks):
        block.forward = through(i)
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for block in blocks:
            del block.forward
