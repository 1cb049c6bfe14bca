"""Attention-weighted Hessians for the value projection, one per key/value head.

GPTQ's Hessian ``XᵀX`` weighs the error of every token's *value* equally. What the
rest of the network sees is not the values but their attention-weighted mixes:
query head ``q`` reads ``P_q V`` (``P_q`` its ``[T, T]`` attention probabilities),
so an error ``ΔW`` in the rows of key/value head ``h`` changes the attention output
by ``P_q X ΔWᵀ`` for every query head ``q`` of ``h``'s group. Its squared size is
``tr(ΔW H_h ΔWᵀ)`` with

    H_h = Σ_{q in group(h)} (P_q X)ᵀ (P_q X)

which is therefore the exact Hessian of the attention output's squared error, as
``XᵀX`` is for the other linears. It matters in practice: attention sinks put most
of every query's weight on a few tokens (the first one above all), whose errors
``XᵀX`` counts once but every query reads. On SmolLM2-135M, GPTQ on v_proj with
``XᵀX`` raises wiki perplexity from 18.7 (round-to-nearest) to 24.8; with ``H_h``
it lowers it to 17.9 (benchmarks/RESULTS.md).

The probabilities come from a pass through the block in which the attention module
computes them explicitly: its configuration is swapped, for that pass only, for a
copy whose attention implementation is a function registered here. It computes
eager attention (GQA, scaling, soft-capping, the causal/sliding/padding mask) and
accumulates the Hessians, then stops the block.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import AttentionInterface

from calib.hessian import Hessian
from calib.runner import BlockInputs

log = logging.getLogger(__name__)
_IMPL = "qtool_value_hessian"


class _Done(Exception):
    """Raised once the attention of a call has been seen: the rest of the block need not run."""


class _Capture:
    def __init__(self, n_kv_heads: int):
        self.n_kv_heads = n_kv_heads
        self.x: torch.Tensor | None = None  # the value projection's input in the current call
        self.hessians: list[Hessian] | None = None


_active: _Capture | None = None


def _scores_mask(attention_mask, sliding_window, b, t, s, device) -> torch.Tensor:
    """Boolean ``[b or 1, t, s]``: which keys each query may read, from whatever mask the model passed."""
    if attention_mask is None:
        q_pos = torch.arange(t, device=device)[:, None] + (s - t)
        k_pos = torch.arange(s, device=device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window:
            allowed &= k_pos > q_pos - sliding_window
        return allowed[None]
    if attention_mask.dim() != 4:
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} (expected [batch, 1, query, key])")
    m = attention_mask[:, 0, :, :s]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that also accumulates the value Hessians of the active capture, then stops the block."""
    cap = _active
    if cap is None or cap.x is None:
        raise RuntimeError("the value-Hessian attention ran without a capture; call collect_value_hessians")
    b, n_heads, t, d = query.shape
    n_kv, s = key.shape[1], key.shape[2]
    if n_kv != cap.n_kv_heads or n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads and {n_kv} key/value heads (expected {cap.n_kv_heads})")
    scaling = d**-0.5 if scaling is None else scaling
    allowed = _scores_mask(attention_mask, kwargs.get("sliding_window"), b, t, s, query.device)
    x = cap.x.reshape(b, s, -1).float()
    if cap.hessians is None:
        cap.hessians = [Hessian.empty(x.shape[-1], x.device) for _ in range(n_kv)]
    softcap = kwargs.get("softcap")
    group = n_heads // n_kv
    mix_first = _mix_first(group, t, s, x.shape[-1])

    def probabilities(qh: int) -> torch.Tensor:  # [b, t, s]: one head at a time, never all heads at once
        scores = (query[:, qh].float() @ key[:, qh // group].float().transpose(1, 2)) * scaling
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num_(0.0)

    for h in range(n_kv):
        heads = range(h * group, (h + 1) * group)
        if not mix_first:
            for qh in heads:
                cap.hessians[h].add(probabilities(qh) @ x)
            continue
        # Σ_q (P_q X)ᵀ(P_q X) = Xᵀ (Σ_q P_qᵀ P_q) X: one Gram per key/value head instead of one per query head.
        m = torch.zeros(b, s, s, device=x.device)
        for qh in heads:
            p = probabilities(qh)
            m.baddbmm_(p.transpose(1, 2), p)
        cap.hessians[h].add_gram(x.reshape(-1, x.shape[-1]).t() @ (m @ x).reshape(-1, x.shape[-1]), group * b * t)
    raise _Done


def accumulation_macs(group: int, t: int, s: int, width: int) -> tuple[int, int]:
    """Multiply-adds per sequence and key/value head of ``Σ_q (P_q X)ᵀ (P_q X)`` and of ``Xᵀ (Σ_q P_qᵀ P_q) X``.

    With ``group`` query heads, ``t`` queries, ``s`` keys and ``width`` input channels:
    ``group·t·(s + width)·width`` against ``group·t·s²`` for the sum of ``P_qᵀ P_q`` plus
    ``s·(s + width)·width`` for the rest. The second wins under grouped-query attention
    (SmolLM2, group 3: about 25% fewer; group 4 at 2,048 tokens and width 4,096: 2.4x fewer).
    """
    return group * t * (s + width) * width, group * t * s * s + s * (s + width) * width


def _mix_first(group: int, t: int, s: int, width: int) -> bool:
    """Whether ``Xᵀ (Σ_q P_qᵀ P_q) X`` needs fewer multiply-adds (:func:`accumulation_macs`)."""
    per_query_head, mixed = accumulation_macs(group, t, s, width)
    return mixed < per_query_head


AttentionInterface.register(_IMPL, _attention)


def collect_value_hessians(block: nn.Module, inputs: BlockInputs, attention: str, v_proj: str,
                           n_kv_heads: int) -> list[Hessian]:
    """``H_h`` for each key/value head ``h`` of the block's attention (module names relative to ``block``).

    Each Hessian counts one row per query head and token, so ``mean`` is the mean over
    both. The block is cut short after the attention in every call.
    """
    global _active
    attn = block.get_submodule(attention)
    if not hasattr(attn, "config"):
        raise ValueError(f"{attention} has no config: its attention implementation cannot be swapped")
    cap = _Capture(n_kv_heads)
    config = attn.config
    swapped = copy.copy(config)
    swapped._attn_implementation_internal = _IMPL

    def keep_input(module, args):
        cap.x = args[0].detach()

    handle = block.get_submodule(v_proj).register_forward_pre_hook(keep_input)
    attn.config, _active = swapped, cap
    try:
        with torch.no_grad():
            for call in inputs.calls:
                cap.x = None
                try:
                    block(call.hidden, *call.args, **call.kwargs)
                except _Done:
                    continue
                raise RuntimeError(f"{attention} did not call the attention function; its Hessians are unavailable")
    finally:
        attn.config, _active = config, None
        handle.remove()
    return cap.hessians
