"""Mixture-of-experts layers as one ``nn.Linear`` per expert projection, and their calibration (issue 17).

In transformers 5 every MoE family (qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek_v2/v3) keeps
its routed experts in one ``*Experts`` module holding two 3-D parameters, ``gate_up_proj``
``[experts, 2 * intermediate, hidden]`` (gate rows first, then up) and ``down_proj``
``[experts, hidden, intermediate]``, called as ``experts(hidden [tokens, hidden], top_k_index
[tokens, k], top_k_weights [tokens, k])``. A quantizer that looks for ``nn.Linear`` skips them
silently. :class:`ExpertLinears` is a drop-in replacement with the same call and the same
arithmetic whose experts are ``experts.{e}.gate_proj``, ``up_proj`` and ``down_proj``
``nn.Linear`` modules: the names of the per-expert checkpoints on the Hub (and what vLLM's and
transformers' quantized MoE loaders read), and linears that calibration hooks, AWQ and GPTQ
handle like any other, each seeing only the tokens routed to its expert.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # quant.gptq.block imports this module
    from quant.gptq.block import SolvedLinears

log = logging.getLogger(__name__)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One routed expert: ``down(act(gate(x)) * up(x))`` with bias-free linears."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """The routed experts of one MoE layer, ``self[e]`` an :class:`ExpertMLP`.

    ``forward(hidden [tokens, hidden], top_k_index [tokens, k] int, top_k_weights [tokens, k])``
    returns ``[tokens, hidden]``: each token's experts' outputs weighted by its routing weights and
    summed, as transformers' fused ``*Experts`` modules compute it (indices equal to the number of
    experts mean "no expert", as there).
    """

    def __init__(self, n_experts: int, hidden: int, intermediate: int, act_fn: nn.Module, device=None, dtype=None):
        super().__init__([ExpertMLP(hidden, intermediate, act_fn, device, dtype) for _ in range(n_experts)])

    @classmethod
    def from_fused(cls, fused: nn.Module) -> ExpertLinears:
        """The same experts as transformers' fused module ``fused`` (weights copied; meta stays meta)."""
        gate_up, down = fused.gate_up_proj, fused.down_proj
        n, two_i, hidden = gate_up.shape
        inter = two_i // 2
        new = cls(n, hidden, inter, fused.act_fn, device=gate_up.device, dtype=gate_up.dtype)
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(new):
                    expert.gate_proj.weight.copy_(gate_up[e, :inter])
                    expert.up_proj.weight.copy_(gate_up[e, inter:])
                    expert.down_proj.weight.copy_(down[e])
        return new

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused-experts module (3-D ``gate_up_proj`` and ``down_proj``)."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.ndim == 3 and down.ndim == 3
            and not isinstance(module, ExpertLinears))


def swap_in_expert_linears(model: nn.Module) -> list[str]:
    """Replace every fused-experts module of ``model`` by an :class:`ExpertLinears` (in place, same
    outputs); returns the names of the replaced modules."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for name in names:
        model.set_submodule(name, ExpertLinears.from_fused(model.get_submodule(name)))
    return names


# --- calibration statistics per expert ---------------------------------------------------------------


class _Captured(Exception):
    """Raised once a block's MoE inputs are recorded: the rest of the block need not run."""


def expert_layers(block: nn.Module) -> dict[str, ExpertLinears]:
    """The routed-experts modules of ``block`` by name (relative to the block)."""
    return {n: m for n, m in block.named_modules() if isinstance(m, ExpertLinears)}


def routed_inputs(block: nn.Module, name: str, calls) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of the experts module ``name`` of ``block`` over the calibration ``calls``:
    ``hidden [tokens, hidden]`` (float32) and ``top_k_index [tokens, k]``, from one forward per call
    cut short after the experts' router ran (the linears before it compute as they are now: quantized)."""
    hidden, index = [], []

    def hook(module, args):
        hidden.append(args[0].detach().float())
        index.append(args[1].detach())
        raise _Captured

    handle = block.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for call in calls:
                try:
                    block(call.hidden, *call.args, **call.kwargs)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return torch.cat(hidden), torch.cat(index)


def min_expert_tokens(in_features: int) -> int:
    """Below this many routed calibration tokens an expert's statistics come from every calibration
    token instead (a ``[in, in]`` Hessian from fewer than ``in / 4`` rows is mostly damping)."""
    return max(16, in_features // 4)


def routed_tokens(index: torch.Tensor, e: int, in_features: int) -> tuple[torch.Tensor, int, bool]:
    """The tokens routed to expert ``e`` by ``index [tokens, k]``: ``(mask [tokens] bool, count, falls back)``,
    where it falls back when the count is below :func:`min_expert_tokens` of its ``in_features``."""
    mask = (index == e).any(dim=-1)
    n = int(mask.sum())
    return mask, n, n < min_expert_tokens(in_features)


def expert_tokens(hidden: torch.Tensor, index: torch.Tensor, e: int) -> tuple[torch.Tensor, int, bool]:
    """Expert ``e``'s statistics rows: its routed tokens, or all ``hidden`` rows where it got fewer than
    :func:`min_expert_tokens`. Returns ``(rows, routed token count, fell back)``."""
    mask, n, fell_back = routed_tokens(index, e, hidden.shape[-1])
    return (hidden, n, True) if fell_back else (hidden[mask], n, False)


def token_summary(counts: list[int], fallback: list[str]) -> dict[str, str]:
    """Summary columns: routed tokens per expert (min / median / max) and the experts that fell back."""
    s = sorted(counts)
    return {"expert tokens min/med/max": f"{s[0]}/{s[len(s) // 2]}/{s[-1]}" if s else "-",
            "expert fallback": ",".join(fallback) or "-"}


def solve_experts(ctx, name: str, layer, names: set[str], solved: SolvedLinears, clips: dict | None = None
                  ) -> tuple[list[int], list[str]]:
    """GPTQ for the routed experts of ``layer`` (``name`` in the block), one expert at a time.

    The experts' inputs and routing are recorded once (:func:`routed_inputs`); each expert's
    gate and up projections are solved under the Hessian of the tokens routed to it, then its down
    projection under that of its own quantized intermediate activations. An expert routed fewer than
    :func:`min_expert_tokens` tokens takes its statistics from every calibration token
    (listed as a fallback); no expert is left unquantized. Each solve goes through ``solved`` (the block's
    :class:`quant.gptq.block.SolvedLinears`: it keeps the packed linear in the block and records its error). ``clips``
    (AWQ+GPTQ: AWQ's clipping ranges by linear name) bound the groups of the projections that have one.
    Returns the routed token counts and the fallbacks.
    """
    from calib.hessian import Hessian

    hidden, index = routed_inputs(ctx.block, name, ctx.inputs.calls)
    counts, fell_back = [], []
    for e, expert in enumerate(layer):
        x, n, fb = expert_tokens(hidden, index, e)
        counts.append(n)
        if fb:
            fell_back.append(str(e))
        def intermediate(x=x, expert=expert):  # the down projection's input, in the expert's own dtype
            z = x.to(expert.gate_proj.weight.dtype)
            return (expert.act_fn(expert.gate_proj(z)) * expert.up_proj(z)).float()

        with torch.no_grad():
            for projs, inputs in ((("gate_proj", "up_proj"), lambda: x), (("down_proj",), intermediate)):
                todo = [p for p in projs if f"{name}.{e}.{p}" in names]
                if not todo:
                    continue
                h = Hessian.empty(getattr(expert, todo[0]).in_features, x.device)
                h.add(inputs())
                H = h.mean
                W = {f"{name}.{e}.{p}": getattr(expert, p).weight.detach().float() for p in todo}
                for n, pw in solved.solve_stacked(W, H, ctx.cfg, clips).items():
                    solved.keep(n, pw, W[n], H)
        del x
    if fell_back:
        log.info("block %d %s: experts %s got fewer than %d routed calibration tokens; their statistics come "
                 "from every token", ctx.index, name, ", ".join(fell_back), min_expert_tokens(hidden.shape[-1]))
    return counts, fell_back
