"""Hooks that watch a model run: decoder-block inputs and per-linear input statistics."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BlockCall:
    """One recorded call of a decoder block: the hidden states and every other argument."""

    hidden: torch.Tensor | None  # [batch, seq, hidden]; None once taken (take_first_hidden)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class _StopForward(Exception):
    """Raised after the last block was recorded: the rest of the model need not run."""


def record_block_calls(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor) -> list[BlockCall]:
    """Run ``model`` on ``input_ids`` with every block replaced by a recorder.

    Each recorder stores its block's call (hidden states, attention mask, position
    embeddings, cache flags...) and passes the hidden states through unchanged, so only
    the embeddings run: the arguments a block receives do not depend on what earlier
    blocks computed, and models that give each block its own mask (sliding-window
    layers) are recorded correctly. Returns one ``BlockCall`` per block.
    """
    calls: list[BlockCall | None] = [None] * len(blocks)

    def recorder(i):
        def forward(hidden, *args, **kwargs):
            calls[i] = BlockCall(hidden, args, kwargs)
            if i == len(blocks) - 1:
                raise _StopForward
            return hidden

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"decoder blocks {missing} were never called; the architecture table is wrong for this model")
    return calls  # type: ignore[return-value]


def take_first_hidden(calls: list[BlockCall]) -> torch.Tensor:
    """Block 0's input hidden states ``[batch, seq, hidden]`` from :func:`record_block_calls`' ``calls``, whose
    ``hidden`` is then set to ``None``: every call refers to that one tensor, so a run that keeps the calls for
    their other arguments would otherwise hold the embeddings' output until its end."""
    hidden = calls[0].hidden
    for c in calls:
        c.hidden = None
    return hidden


@dataclass
class InputStats:
    """Per-input-channel statistics of one linear's inputs over the calibration tokens."""

    abs_sum: torch.Tensor  # [in] float32, sum of |x|
    n_tokens: int = 0
    xtx: torch.Tensor | None = None  # [in, in] float32, sum of w_t x_t x_tᵀ, when asked for

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n_tokens, 1)

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None, xtx: bool = True) -> None:
        """Accumulate inputs ``x [..., in]``; ``weight [...]`` (per token) weighs them in ``xtx`` only, and
        ``xtx=False`` leaves them out of it."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0)
        self.n_tokens += x.shape[0]
        if self.xtx is not None and xtx:
            xw = x if weight is None else x * weight.reshape(-1, 1).to(x)
            self.xtx.addmm_(xw.t(), x)


@contextlib.contextmanager
def linear_input_stats(modules: dict[str, nn.Module], groups: list[tuple[str, ...]] | None = None, xtx: bool = False,
                       token_weight: Callable[[], torch.Tensor | None] | None = None,
                       xtx_now: Callable[[], bool] | None = None):
    """Collect :class:`InputStats` for each named linear while the body runs.

    ``groups`` lists names of linears that read the same input (q/k/v, from the
    architecture table's ``sequential``): one hook on the first of a group feeds one
    shared statistics object, so ``XᵀX`` is computed once per distinct input.
    ``token_weight()``, if given, returns the weights ``[b, t]`` of the tokens of the
    call being run; ``XᵀX`` then sums ``w_t x_t x_tᵀ``. ``xtx_now()``, if given, says whether the call
    being run counts in ``XᵀX`` (the other statistics take every call).
    """
    groups = groups or [(n,) for n in modules]
    grouped = {n for g in groups for n in g}
    groups = list(groups) + [(n,) for n in modules if n not in grouped]
    stats: dict[str, InputStats] = {}

    def hook(names):
        def fn(module, inputs):
            x = inputs[0].detach()
            if names[0] not in stats:
                n, dev = x.shape[-1], x.device
                shared = InputStats(torch.zeros(n, device=dev), xtx=torch.zeros(n, n, device=dev) if xtx else None)
                stats.update({name: shared for name in names})
            stats[names[0]].add(x, token_weight() if token_weight is not None else None,
                                xtx_now() if xtx_now is not None else True)

        return fn

    handles = [modules[g[0]].register_forward_pre_hook(hook(g)) for g in groups if g[0] in modules]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record_inputs(modules: dict[str, nn.Module]):
    """Keep every input tensor each named module receives while the body runs (detached)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    handles = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen[n].append(inp[0].detach()))
               for n, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
