"""GPTQ for one decoder block: the pipeline's method (``quantize_block``).

Collects the Hessians sub-layer group by sub-layer group (true-sequential), solves each
group with :func:`quant.gptq.solver.gptq_quantize` (the value projection head by head
under its attention-weighted Hessians), routes experts through :mod:`quant.moe`, runs
AWQ's search first for AWQ+GPTQ, and builds the plain-GPTQ alternative for the
whole-model check.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace

import torch

from calib.hessian import Hessian, collect_hessians
from calib.value_hessian import collect_value_hessians
from quant.arch import value_heads
from quant.awq.fold import SCALE_KEY
from quant.config import QuantConfig
from quant.formats import PackedWeight
from quant.gptq.solver import gptq_quantize, hessian_error, solve_value_heads
from quant.layers import set_quantized, to_quant_linears
from quant.methods import BlockContext, BlockResult
from quant.moe import expert_layers, solve_experts, token_summary

log = logging.getLogger(__name__)


def _sequential_groups(ctx: BlockContext) -> list[tuple[str, ...]]:
    """The architecture's sub-layer groups (linears sharing an input, in execution order), minus skipped linears."""
    wanted = set(ctx.names)
    groups = [tuple(n for n in g if n in wanted) for g in ctx.arch.sequential]
    listed = {n for g in groups for n in g}
    return [g for g in groups if g] + [(n,) for n in ctx.names if n not in listed]


def _by_hessian(names, hessians) -> list[list[str]]:
    """``names`` grouped by the Hessian object they share, in order."""
    out: dict[int, list[str]] = {}
    for n in names:
        out.setdefault(id(hessians[n]), []).append(n)
    return list(out.values())


def _value_hessians(ctx: BlockContext) -> tuple[list[torch.Tensor], int] | None:
    """The attention-weighted Hessian of each key/value head (``calib.value_hessian``) and the first value row,
    or None where unavailable."""
    where = value_heads(ctx.block, ctx.arch.v_proj, ctx.arch.v_fused)
    if where is None:
        log.info("block %d: no head layout on %s; it keeps the plain Hessian", ctx.index, ctx.arch.v_proj)
        return None
    try:
        heads = collect_value_hessians(ctx.block, ctx.inputs, where.attention, ctx.arch.v_proj, where.n_kv_heads)
    except (ValueError, RuntimeError) as e:
        log.warning("block %d: attention-weighted value Hessians unavailable (%s); %s keeps the plain one",
                    ctx.index, e, ctx.arch.v_proj)
        return None
    return [h.mean for h in heads], where.first_row


def _batch_hessians(ctx: BlockContext, batch: tuple[tuple[str, ...], ...]) -> tuple[dict, tuple | None]:
    """The Hessians of one batch of sub-layer groups (:func:`calib.hessian.collect_hessians`) and, where the
    value projection is among them and ``value_hessian`` is on, its per-head Hessians (:func:`_value_hessians`)."""
    names = [n for g in batch for n in g]
    hessians = collect_hessians(ctx.block, ctx.inputs, list(batch))
    values = _value_hessians(ctx) if ctx.cfg.gptq.value_hessian and ctx.arch.v_proj in names else None
    return hessians, values


def _input_scaled(hessians: dict, values: tuple | None, scales: dict[str, torch.Tensor], v_proj: str
                  ) -> tuple[dict, tuple | None]:
    """The Hessians of the same inputs divided by AWQ's input scales (``scales``: ``{linear: s [in]}``, the
    folded ones): ``x / s`` gives ``diag(1/s) H diag(1/s)``, for ``XᵀX`` and each value head alike. Linears that
    shared one Hessian still do; a linear without a scale keeps its Hessian."""
    def scaled(h: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        if s is None:
            return h
        r = 1.0 / s.to(device=h.device, dtype=h.dtype)
        return h * r[:, None] * r[None, :]

    out, by_id = {}, {}
    for n, h in hessians.items():
        if id(h) not in by_id:
            by_id[id(h)] = Hessian(scaled(h.xtx, scales.get(n)), h.n_tokens)
        out[n] = by_id[id(h)]
    if values is not None:
        heads, first_row = values
        values = [scaled(v, scales.get(v_proj)) for v in heads], first_row
    return out, values


def _awq_first(ctx: BlockContext) -> tuple[dict, dict, dict, dict]:
    """AWQ's scale and clip search on the block, scales folded in (``quant.awq.search_block``).

    Returns ``(float weights of the folded linears, clips per linear, artifacts, info)``.
    The clips are dropped with act-order groups, which are not the natural groups
    AWQ searched them for (static groups are).
    """
    from quant.awq import CLIP_KEY, search_block

    artifacts, info, weights = search_block(ctx)
    clips = {n: artifacts[f"{n}.{CLIP_KEY}"] for n in ctx.names if f"{n}.{CLIP_KEY}" in artifacts}
    if clips and ctx.cfg.gptq.act_order and not ctx.cfg.gptq.static_groups:
        log.info("AWQ+GPTQ with act-order: AWQ's clipping ranges are not used (they belong to natural groups)")
        clips = {}
    sources = {n: weights[f"{n}.weight"] for n in ctx.names if f"{n}.weight" in weights}
    return sources, clips, artifacts, info


@dataclass
class SolvedLinears:
    """The block's solved linears, each set into the block as soon as it is kept (so that the inputs of later
    groups see it), and what the summary reports of them."""
    block: torch.nn.Module
    index: int
    packed: dict[str, PackedWeight] = field(default_factory=dict)
    rel_errors: list[float] = field(default_factory=list)  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), per linear
    damps: list[float] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def solve_stacked(self, Ws: dict[str, torch.Tensor], H: torch.Tensor, cfg: QuantConfig, clips: dict | None = None,
                      order: torch.Tensor | None = None) -> dict[str, PackedWeight]:
        """GPTQ on linears that share one input (``Ws``: ``{name: W [out, in]}``, one ``H [in, in]``) as one
        matrix of their stacked rows (``clips``: AWQ's clipping ranges by linear name, ``[out, in/g]`` each, used
        where every linear has one; ``order [in]``: the act-order ranking, where given); returns each linear's rows,
        not yet kept (:meth:`keep`)."""
        clip = torch.cat([clips[n] for n in Ws]).to(H.device) if clips and all(n in clips for n in Ws) else None
        res = gptq_quantize(torch.cat(list(Ws.values())), H, cfg, clip, order)
        if res.fallback:
            log.warning("block %d %s: GPTQ fell back to round-to-nearest (%s)", self.index, ",".join(Ws),
                        res.fallback)
            self.fallbacks.extend(Ws)
        else:
            self.damps.append(res.damp)
        out, rows = {}, 0
        for n, W in Ws.items():
            out[n] = res.packed.rows(rows, rows + W.shape[0])
            rows += W.shape[0]
        return out

    def keep(self, name: str, pw: PackedWeight, W: torch.Tensor, H: torch.Tensor) -> None:
        """``pw`` becomes the block's linear ``name``; its error under ``H`` relative to ``W``'s own is recorded."""
        self.packed[name] = pw
        wq = pw.dequantize(H.dtype).to(H.device)
        self.rel_errors.append(hessian_error(W, wq, H) / max(hessian_error(W, torch.zeros_like(wq), H), 1e-30))
        set_quantized(self.block, name, pw)

    def summary(self) -> dict[str, str]:
        info = {"rel err": f"{sum(self.rel_errors) / len(self.rel_errors):.2e}" if self.rel_errors else "-",
                "max damp": f"{max(self.damps, default=0):.3g}"}
        if self.fallbacks:
            info["rtn fallback"] = ",".join(self.fallbacks)
        return info


def _solve_batch(ctx: BlockContext, solved: SolvedLinears, names: list[str], hessians: dict, values: tuple | None,
                 sources: dict, clips: dict) -> None:
    """Solve one batch's linears (a sub-layer group; every group at once without true-sequential). Linears that
    share an input share H, so their rows are solved as one matrix; the value projection, given its per-head
    Hessians (``values``), head by head instead. ``sources``: AWQ+GPTQ's
    folded weights (else the block's own); ``clips``: AWQ's clipping ranges, bounding the groups."""
    arch, cfg = ctx.arch, ctx.cfg
    fused_qkv = arch.layout is not None and arch.layout.fused_qkv is not None
    for shared in _by_hessian(names, hessians):
        H = hessians[shared[0]].mean
        # Where the checkpoint fuses q, k and v into one linear (InternLM2's wqkv), they need one act-order
        # column order, hence one ranking: XᵀX's diagonal, for the value rows too.
        order = torch.diagonal(H).clone() if fused_qkv and arch.v_proj in shared else None
        Ws = {n: sources.get(n, ctx.block.get_submodule(n).weight).detach().to(device=H.device, dtype=H.dtype)
              for n in shared}
        done = {}
        if values and arch.v_proj in shared:
            per_head, first_row = values
            pw, damp = solve_value_heads(Ws[arch.v_proj], per_head, cfg, clips.get(arch.v_proj), first_row, H, order)
            if pw is None:
                log.warning("block %d %s: a value head fell back to round-to-nearest; solving it with XᵀX",
                            ctx.index, arch.v_proj)
            else:
                done[arch.v_proj] = pw
                solved.damps.append(damp)
        rest = [n for n in shared if n not in done]
        if rest:
            done.update(solved.solve_stacked({n: Ws[n] for n in rest}, H, cfg, clips, order))
        for n in shared:
            solved.keep(n, done[n], Ws[n], H)


def quantize_block(ctx: BlockContext, first: tuple[dict, tuple | None] | None = None) -> BlockResult:
    """GPTQ for one decoder block, in place.

    True-sequential (the default): each sub-layer group (q/k/v, o, gate/up, down)
    gets its Hessian from a forward pass in which the groups before it already
    compute with their quantized weights (the dequantized values; the linears are
    swapped for packed layers when the block is done). Otherwise every Hessian
    comes from the full-precision block. With ``awq_first``, AWQ's scales are
    searched and folded into the block first and its clipping ranges bound the
    groups; GPTQ then rounds instead of RTN. Where guard windows exist, AWQ+GPTQ also
    quantizes a copy of the block with plain GPTQ (same inputs, its own Hessians): the
    ``"gptq"`` alternative, which the whole-model check keeps where AWQ's scales made
    the model worse. The two share the first batch's Hessians (``first``, taken from the block before AWQ's scales
    are folded in; AWQ+GPTQ's are the same divided by its input scales, :func:`_input_scaled`): its inputs are the
    same for both, and the value projection's per-head Hessians are the dearest of the block's.
    """
    if ctx.inputs is None:
        raise ValueError("GPTQ needs calibration inputs")
    cfg = ctx.cfg
    plain = copy.deepcopy(ctx.block) if cfg.gptq.awq_first and ctx.inputs.guard else None
    moe_layers = expert_layers(ctx.block)
    routed = {n for n in ctx.names if any(n.startswith(f"{m}.") for m in moe_layers)}
    groups = [g for g in _sequential_groups(ctx) if not set(g) & routed]  # routed experts: solve_experts
    todo = [(g,) for g in groups] if cfg.gptq.true_sequential else [tuple(groups)]
    t_hessian = t_solve = 0.0
    if plain is not None and todo:  # before the search folds its scales into the block
        t = time.perf_counter()
        first = _batch_hessians(ctx, todo[0])
        t_hessian += time.perf_counter() - t
    sources, clips, artifacts, info = _awq_first(ctx) if cfg.gptq.awq_first else ({}, {}, {}, {})
    solved = SolvedLinears(ctx.block, ctx.index)
    for k, batch in enumerate(todo):
        t = time.perf_counter()
        if k == 0 and first is not None:
            scales = {n: artifacts[f"{n}.{SCALE_KEY}"] for g in batch for n in g if f"{n}.{SCALE_KEY}" in artifacts}
            hessians, values = _input_scaled(*first, scales, ctx.arch.v_proj)
        else:
            hessians, values = _batch_hessians(ctx, batch)
        t_hessian += time.perf_counter() - t
        t = time.perf_counter()
        _solve_batch(ctx, solved, [n for g in batch for n in g], hessians, values, sources, clips)
        t_solve += time.perf_counter() - t
        del hessians, values
    for name, layer in moe_layers.items():  # after attention, whose quantized outputs the router sees
        t = time.perf_counter()
        info.update(token_summary(*solve_experts(ctx, name, layer, {n for n in routed if n.startswith(f"{name}.")},
                                                 solved, clips)))
        t_solve += time.perf_counter() - t
    info.update({"hessian s": f"{t_hessian:.2f}", "solve s": f"{t_solve:.2f}", **solved.summary()})
    result = BlockResult(packed=solved.packed, info=info, artifacts=artifacts)
    if plain is not None:
        t = time.perf_counter()
        alone = quantize_block(BlockContext(ctx.index, plain, ctx.names, cfg.with_(gptq=replace(cfg.gptq, awq_first=False)),
                                            ctx.arch, ctx.inputs), first)
        to_quant_linears(plain, alone.packed, cfg.format)
        result.alternatives["gptq"] = plain
        info["plain gptq s"] = f"{time.perf_counter() - t:.2f}"
    return result
