"""The sequential runner: one decoder block at a time on the compute device.

The model stays on the CPU. Each block in turn moves to the device (in the compute
dtype), sees the calibration batch, is handed to the quantizer, and its *quantized*
outputs become the next block's inputs (unless the method passes other ones on:
AWQ passes its search windows on as the full-precision block outputs them). Peak
device memory is one block plus the calibration activations.

Besides the windows the methods search on, held-out sets of windows travel
through the same blocks: ``accept`` (a method may test a choice on them, e.g.
AWQ's clipping ranges), ``guard`` (only the pipeline's comparisons with
round-to-nearest read them, :mod:`quant.guard`, :mod:`quant.model_check`) and ``check``
(windows of other kinds of text than the calibration's, which only the whole-model check scores).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from calib.collectors import BlockCall, record_block_calls, take_first_hidden


def move(obj, device, dtype=None):
    """Tensors inside nested tuples/lists/dicts moved to ``device`` (floating ones cast to ``dtype``)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device, dtype) for k, v in obj.items()}
    return obj


def _tensors(block: nn.Module):
    return itertools.chain(block.named_parameters(), block.named_buffers())


def _cast_back(block: nn.Module, names: set[str], dtype: torch.dtype) -> None:
    """Back to the stored dtype, only the tensors the block held before it was quantized: new ones
    (packed weights, float16 scales) keep the dtype they were made with."""
    for name, t in _tensors(block):
        if name in names and t.is_floating_point():
            t.data = t.data.to(dtype)


def first_output(out):
    """The hidden states of a module's output: decoder blocks and attention modules return tuples."""
    return out[0] if isinstance(out, tuple) else out


def run_calls(block: nn.Module, calls: list[BlockCall], release: bool = False,
              hold_dense: bool = True) -> list[torch.Tensor]:
    """``block``'s outputs (hidden states only), one per call. Quantized linears compute with their
    dequantized weights (:func:`quant.modules.dense_weights`): dequantized once and held for all the calls,
    or with ``hold_dense=False`` anew in every call (a block's dense copy never held). ``release``: each
    output is written over its call's hidden states (which it returns) and the call lets go of them (reading
    ``call.hidden`` afterwards fails): a block's inputs and outputs are never both held, and the activations
    passed from block to block live in the same memory for the whole run (the runner's next-input pass; AWQ's
    statistics pass, which passes its outputs on). Memory that is allocated once is not freed in pieces
    between the transients of every forward, which is what fragments the heap (``benchmarks/RESULTS.md``,
    issue 15)."""
    from quant.modules import dense_weights

    outs = []
    with torch.no_grad(), dense_weights(block, hold_dense):
        for c in calls:
            out = first_output(block(c.hidden, *c.args, **c.kwargs))
            if release:
                out = _into(c.hidden, out)
                c.hidden = None
            outs.append(out)
    return outs


def _into(slot: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` written into ``slot`` (returned) where they have the same shape and dtype; else ``out``."""
    if out is slot or out.shape != slot.shape or out.dtype != slot.dtype or out.device != slot.device:
        return out
    return slot.copy_(out)


@dataclass
class BlockInputs:
    """The calibration inputs of one block, one :class:`BlockCall` per minibatch, on the device.

    ``calls``: the windows methods compute statistics and search on; ``accept``, ``guard``
    and ``check``: held-out windows (see the module docstring), possibly empty.
    """

    calls: list[BlockCall]
    accept: list[BlockCall] = field(default_factory=list)
    guard: list[BlockCall] = field(default_factory=list)
    check: list[BlockCall] = field(default_factory=list)
    # "calls", "accept": calib.gradients.OutputGradients at the block's output on that set's first minibatch
    loss: dict = field(default_factory=dict)
    # (block, calls, next inputs) known already; block None: whatever block is left in place
    _known: list = field(default_factory=list, repr=False)

    def pass_on(self, calls: list[BlockCall], hidden: list[torch.Tensor]) -> None:
        """The next block's inputs on ``calls`` are ``hidden`` (one per call), whatever block is left in place:
        a method that propagates full-precision outputs (AWQ's search windows) sets them."""
        self._known.append((None, calls, hidden))

    def remember(self, block: nn.Module, calls: list[BlockCall], outputs: list[torch.Tensor]) -> None:
        """``outputs`` are :func:`run_calls` ``(block, calls)`` as ``block`` now computes; the runner reuses
        them for the next block's inputs if ``block`` is the one left in place, unchanged since."""
        self._known.append((block, calls, outputs))

    def known(self, block: nn.Module, calls: list[BlockCall]) -> list[torch.Tensor] | None:
        """The next block's inputs on ``calls`` where already known (:meth:`pass_on`, :meth:`remember`)."""
        return next((o for b, c, o in self._known if c is calls and calls and (b is None or b is block)), None)

    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's outputs for every search minibatch (hidden states only)."""
        return run_calls(block, self.calls)

    @property
    def n_tokens(self) -> int:
        return sum(c.hidden.shape[0] * c.hidden.shape[1] for c in self.calls)


def _minibatches(ids: torch.Tensor, size: int, lead: int | None) -> list[torch.Tensor]:
    """``ids [n, seq]`` in minibatches of ``size`` windows, the first of ``lead`` where given."""
    if not len(ids):
        return []
    if lead is None or lead >= len(ids):
        return list(ids.split(size))
    return [ids[:lead], *ids[lead:].split(size)]


BlockFn = Callable[[int, nn.Module, BlockInputs], None]
CALIB_BATCH = 8  # calibration windows per block call


def run_sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    process_block: BlockFn,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    batch_size: int = CALIB_BATCH,
    on_block_done: Callable[[int, list], None] | None = None,
    held_out: tuple[int, ...] = (0, 0),
    before_block: Callable[[int], None] | None = None,
    start: int = 0,
    start_hidden: list[list[torch.Tensor]] | None = None,
    lead: int | None = None,
) -> None:
    """Feed ``input_ids [n, seq]`` through ``blocks`` one at a time, calling ``process_block`` on each.

    The last ``held_out = (n_accept, n_guard[, n_check])`` rows of ``input_ids`` become the
    held-out ``accept``, ``guard`` and ``check`` sets (in that order). ``process_block(i, block,
    inputs)`` may change the block in place (replace its linears by quantized ones) or
    put another module at ``blocks[i]``; the outputs of whatever module is at
    ``blocks[i]`` when it returns are the next block's inputs. ``before_block(i)`` runs first (it may
    load the block's tensors: the blocks may sit on the meta device until then); ``on_block_done(i,
    hidden)`` after the next block's inputs are computed (``hidden``: per set, per minibatch, the
    hidden states after block ``i``; the next block writes its outputs over them, so copy what you keep) and the
    block is back on the CPU. ``start`` and
    ``start_hidden`` (such a ``hidden``, after block ``start - 1``; its lists are emptied) continue a stopped run.
    The windows are run ``batch_size`` at a time; ``lead`` makes the first minibatch of the search and
    ``accept`` sets ``lead`` windows (AWQ judges its choices on those). Outputs that ``process_block``
    already computed with the block it leaves (:meth:`BlockInputs.remember`) are reused, not run again, and
    next inputs it sets (:meth:`BlockInputs.pass_on`) are taken as they are.
    """
    n_search = input_ids.shape[0] - sum(held_out)
    if n_search < 1:
        raise ValueError(f"{input_ids.shape[0]} calibration windows leave none to search on after {held_out} held out")
    sets = input_ids.split([n_search, *held_out])
    per_batch = [[record_block_calls(model, blocks, ids) for ids in _minibatches(part, batch_size, lead if k < 2 else None)]
                 for k, part in enumerate(sets)]
    # Every set's minibatches are views of one tensor, which every block's outputs are written over: allocated
    # once (past the mmap threshold, outside the heap) rather than in pieces between each forward's transients.
    store, at, hidden = None, 0, []
    for k, part in enumerate(per_batch):
        hidden.append([])
        for j, calls in enumerate(part):
            h = take_first_hidden(calls)  # the embeddings' output, which the calls let go of
            if start_hidden is not None:
                h = start_hidden[k][j]
            if store is None:
                store = torch.empty((input_ids.shape[0], *h.shape[1:]), dtype=compute_dtype, device=device)
            hidden[k].append(store[at:at + h.shape[0]].copy_(h))
            at += h.shape[0]
            if start_hidden is not None:
                start_hidden[k][j] = None
            del h
    for part in start_hidden or []:  # emptied: the caller's lists would hold the first inputs through the whole run
        part.clear()
    for i in range(start, len(blocks)):
        if before_block is not None:
            before_block(i)
        block = blocks[i]
        store_dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), compute_dtype)
        held = {n for n, t in _tensors(block) if t.is_floating_point()}
        block.to(device=device, dtype=compute_dtype)
        calls = [[BlockCall(h, move(b[i].args, device, compute_dtype), move(b[i].kwargs, device, compute_dtype))
                  for h, b in zip(hs, part)] for hs, part in zip(hidden, per_batch)]
        slots, hidden = hidden, None  # each block's outputs are written over its inputs (run_calls(release=True))
        inputs = BlockInputs(*calls)
        process_block(i, block, inputs)
        block = blocks[i]
        hidden = []
        for sl, part in zip(slots, calls):
            outs = inputs.known(block, part) or run_calls(block, part, release=True)
            hidden.append([_into(s, o) for s, o in zip(sl, outs)])  # what a method computed is copied in
        block.to(device="cpu")
        _cast_back(block, held, store_dtype)
        if on_block_done is not None:
            on_block_done(i, hidden)
