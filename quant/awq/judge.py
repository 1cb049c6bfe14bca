"""Judging AWQ's choices by what the block computes, not by a per-linear proxy.

The closed form ``Σ ΔW H ΔWᵀ`` (:mod:`quant.awq.search`) is the exact output error
of the scaled linears, but not of what they feed: q and k reach the rest of the
network only through the softmax, gate and up through the activation and their
product. As the AWQ paper does (Lin et al., 2024, §3.2: the loss is the output of
the block's attention or MLP), a candidate is judged here by the output of the
module the scaled linears feed, the *judge* of its scaling group in the
architecture table (:class:`quant.arch.ScaleGroup`).

A :class:`Probe` records a module's calls (arguments and full-precision outputs)
on a few calibration windows; :func:`probe_error` runs it again with some linears'
weights replaced (their fake-quantized values) and returns what the output error
costs: the change of the model's loss to second order where the probe carries the
loss gradients at the module's output (:func:`attach_gradients`,
:mod:`calib.gradients`), else the token-weighted squared output error.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from calib.collectors import BlockCall
from calib.gradients import OutputGradients, module_gradients
from calib.runner import first_output
from quant.guard import token_weights


@dataclass
class Probe:
    """The calls of one module on some windows: inputs, full-precision outputs ``[b, t, d]`` and token weights ``[b, t]``."""

    name: str
    inputs: list[tuple[tuple, dict]] = field(default_factory=list)
    refs: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    grads: list[OutputGradients] = field(default_factory=list)  # per call, at the module's output: judge by the loss


@contextlib.contextmanager
def probing(block: nn.Module, names: list[str], token_weight: Callable[[], torch.Tensor]):
    """Record every call of the modules ``names`` (relative to ``block``) while the body runs the block;
    ``token_weight()`` gives the weights ``[b, t]`` of the tokens of the call being run."""
    probes = {n: Probe(n) for n in dict.fromkeys(names)}

    def hook(name):
        def fn(module, args, kwargs, out):
            probes[name].inputs.append((args, kwargs))
            probes[name].refs.append(first_output(out).detach())
            probes[name].weights.append(token_weight())

        return fn

    handles = [block.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in probes]
    try:
        yield probes
    finally:
        for h in handles:
            h.remove()


def call_weights(call: BlockCall, weigh: bool = True) -> torch.Tensor:
    """The token weights ``[b, t]`` of a block call: :func:`quant.guard.token_weights` of its input (the
    residual stream a module's output is added to), or all ones without ``weigh``."""
    if weigh:
        return token_weights(call.hidden)
    return torch.ones(call.hidden.shape[:-1], device=call.hidden.device)


def record_probes(block: nn.Module, names: list[str], calls: list[BlockCall], weigh: bool = True) -> dict[str, Probe]:
    """Run ``block`` on ``calls`` and record every call of the modules ``names`` (see :func:`probing`)."""
    current: list[torch.Tensor] = []
    with torch.no_grad(), probing(block, names, lambda: current[0]) as probes:
        for c in calls:
            current[:] = [call_weights(c, weigh)]
            block(c.hidden, *c.args, **c.kwargs)
    return probes


@contextlib.contextmanager
def swapped_weights(block: nn.Module, weights: dict[str, torch.Tensor]):
    """Linears ``name`` of ``block`` compute with ``weights[name]`` (``[out, in]``) inside the body."""
    saved = {}
    try:
        for name, w in weights.items():
            lin = block.get_submodule(name)
            saved[name] = lin.weight.data
            lin.weight.data = w.to(device=lin.weight.device, dtype=lin.weight.dtype)
        yield
    finally:
        for name, w in saved.items():
            block.get_submodule(name).weight.data = w


def attach_gradients(block: nn.Module, probes: dict[str, Probe], calls: list[BlockCall], at_output: OutputGradients
                     ) -> None:
    """Give ``probes`` (recorded on the block ``calls``, one module call per block call) the loss gradients at
    their modules' outputs, carried back from ``at_output`` (the block output's, on the calls' windows in order)."""
    for name, probe in probes.items():
        if len(probe.inputs) != len(calls):
            raise ValueError(f"{name} ran {len(probe.inputs)} times in {len(calls)} block calls; it cannot be "
                             "judged by the loss")
    start = 0
    for c in calls:
        n = c.hidden.shape[0]
        grads = module_gradients(block, c.hidden, c.args, c.kwargs, at_output.windows(start, start + n), list(probes))
        for name, probe in probes.items():
            probe.grads.append(grads[name])
        start += n


def probe_error(block: nn.Module, probe: Probe, weights: dict[str, torch.Tensor]) -> float:
    """What ``probe``'s module's output error costs with the linears in ``weights`` replaced: with loss gradients
    (:attr:`Probe.grads`), the loss change in nats per token (:meth:`OutputGradients.loss_change`, may be
    negative); else ``Σ_t w_t ‖out_t - ref_t‖²``."""
    module = block.get_submodule(probe.name)
    total = 0.0
    with torch.no_grad(), swapped_weights(block, weights):
        for j, ((args, kwargs), ref, w) in enumerate(zip(probe.inputs, probe.refs, probe.weights)):
            out = first_output(module(*args, **kwargs))
            if probe.grads:
                total += probe.grads[j].loss_change(out.float() - ref.float())
                continue
            d = (out.float() - ref.float()).pow(2).sum(-1)
            if d.numel() != w.numel():
                raise ValueError(f"{probe.name} returns {d.numel()} token rows for a call of {w.numel()} tokens; "
                                 "it cannot judge per token")
            total += float((d * w.reshape(d.shape)).sum())  # OPT's fc1/fc2 see the tokens flattened
    return total


def judge_of(groups, name: str) -> str:
    """The module a quantized linear is judged by: its scaling group's judge, else its own output."""
    return next((g.judge for g in groups if name in g.linears and g.judge), name)
