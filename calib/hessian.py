"""GPTQ's Hessians: ``H = XᵀX / n`` of each linear's inputs, accumulated in float32.

Stateless pieces in the llm-compressor manner (make, accumulate) plus one
collector that runs a decoder block on its calibration inputs with hooks.
Linears that read the same tensor (q/k/v, gate/up) share one Hessian, computed
once. The factor 2 of the paper's ``H = 2XXᵀ`` is left out: GPTQ's solution
does not change when H is scaled, and damping is relative to H's mean diagonal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calib.runner import BlockInputs


@dataclass
class Hessian:
    """``xtx``: float32 ``[in, in]``, the sum of ``x xᵀ`` over ``n_tokens`` input rows."""

    xtx: torch.Tensor
    n_tokens: int = 0

    @classmethod
    def empty(cls, n: int, device: torch.device | str = "cpu") -> Hessian:
        return cls(torch.zeros(n, n, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x[..., in]`` (any float dtype; summed in float32)."""
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        self.xtx.addmm_(x.t(), x)
        self.n_tokens += x.shape[0]

    def add_gram(self, gram: torch.Tensor, n_rows: int) -> None:
        """Accumulate a Gram matrix ``Yᵀ Y`` of ``n_rows`` rows computed elsewhere (symmetrized: it is
        symmetric up to rounding)."""
        self.xtx.add_(gram + gram.t(), alpha=0.5)
        self.n_tokens += n_rows

    @property
    def mean(self) -> torch.Tensor:
        """``XᵀX / n``: the Hessian of the layer's mean squared output error, up to a factor 2."""
        return self.xtx / max(self.n_tokens, 1)


class _AllCaptured(Exception):
    """Raised from a hook once every requested input was seen: the rest of the block need not run."""


def collect_hessians(block: nn.Module, inputs: BlockInputs, groups: list[tuple[str, ...]],
                     stop_early: bool = True) -> dict[str, Hessian]:
    """One :class:`Hessian` per linear named in ``groups`` (names relative to ``block``).

    Each group lists linears that read the same input; they get the same object.
    With ``stop_early`` the block's forward is cut short as soon as every group's
    input has been seen once in a call (each linear of a decoder block runs once
    per forward), so collecting q/k/v costs only the norm before them.
    """
    groups = [g for g in groups if g]
    hessians: dict[str, Hessian] = {}
    seen: set[int] = set()

    def hook(i: int, names: tuple[str, ...]):
        def fn(module, args):
            x = args[0].detach()
            if names[0] not in hessians:
                shared = Hessian.empty(x.shape[-1], x.device)
                hessians.update({n: shared for n in names})
            hessians[names[0]].add(x)
            seen.add(i)
            if stop_early and len(seen) == len(groups):
                raise _AllCaptured

        return fn

    handles = [block.get_submodule(g[0]).register_forward_pre_hook(hook(i, g)) for i, g in enumerate(groups)]
    try:
        with torch.no_grad():
            for call in inputs.calls:
                seen.clear()
                try:
                    block(call.hidden, *call.args, **call.kwargs)
                except _AllCaptured:
                    pass
    finally:
        for h in handles:
            h.remove()
    missing = [g[0] for g in groups if g[0] not in hessians]
    if missing:
        raise RuntimeError(f"linears {missing} never ran in the block's forward; the architecture table is wrong")
    return hessians
