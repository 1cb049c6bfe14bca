"""AWQ: activation-aware scales, range clipping, then round-to-nearest. Search, then apply.

Per decoder block (:func:`quantize_block`):

1. one forward pass of the full-precision block collects, for every distinct
   linear input, ``mean|x|`` (every window) and ``H = Σ w_t x_t x_tᵀ`` (the first
   ``screen_windows``: a subsample is enough for a screen) (:mod:`calib.collectors`;
   ``w_t = 1 / ‖h_t‖²``, :func:`quant.guard.token_weights`, unless
   ``token_weighting`` is off);
2. for each scaling group of the architecture table, :func:`search.search_scale`
   evaluates every ``α`` of the grid in closed form (the linears' own output
   error). Where the group has a judge module (attention, MLP), that is only the
   screen: RTN and the ``n_judge - 1`` best candidates are run through the judge
   on the first minibatch (``judge_windows`` windows) and the one whose judge output error costs least
   wins (:mod:`quant.awq.judge`): by default the change of the model's loss it makes, to second order,
   from the loss gradients at the block's output (``AWQOptions.judge``; :mod:`calib.gradients`, computed
   by the pipeline before the first block), else the squared error. Judging by the loss, the groups
   without a judge module (v -> o, up -> down) are judged at their consumer's output. The scale is folded into the producer
   (:mod:`quant.awq.fold`); the folded block is checked against the original on
   one minibatch, and a group whose fold changes the output is dropped with a warning;
3. :func:`search.search_clip` picks a range fraction per (row, group) of every
   quantized linear, on the folded weights; a linear keeps its clips only where
   they lower what its judge module's output error costs on the held-out ``accept`` windows;
4. :func:`apply_block` quantizes with the clips (fake-quantized weights plus their codes).

The next block's statistics come from the full-precision model's activations, as in
the AWQ paper (Lin et al., 2024) and AutoAWQ: the search windows are passed on as the
statistics pass's outputs (:meth:`calib.runner.BlockInputs.pass_on`), which saves a
forward pass per block; ``quantized_inputs`` runs them through the quantized block
instead. The held-out windows always go through the quantized blocks.

The pipeline's RTN guard (:mod:`quant.guard`) then keeps round-to-nearest for any
block where it is closer to the full-precision block on the ``guard`` windows.

The search results (``<linear>.awq_scale`` and ``<linear>.awq_clip``) are saved
in the checkpoint as ``qtool/awq_search.safetensors``; :func:`apply_search`
(or ``AWQOptions(search_file=...)``) replays them without calibration data and
gives a bit-identical checkpoint.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from calib.collectors import linear_input_stats
from calib.runner import run_calls
from quant import heap
from quant.awq.fold import (
    CLIP_KEY,
    SCALE_KEY,
    fold_scales,
    foldable_groups,
    group_scales,
    module_or_none,
    tie_to_values,
)
from quant.awq.experts import FeedForward, accept_expert_clips
from quant.awq.search_file import (
    PROBE_KEY,
    block_probe,
    check_search_file,
    first_weight,
    load_search,
    search_metadata,
    search_path,
    weight_probe,
)
from quant.awq.judge import attach_gradients, call_weights, judge_of, probe_error, probing, record_probes
from quant.awq.replay import apply_block, apply_search, quantize_linears
from quant.awq.search import QuantSpec, ScaleResult, _fake_quantize, search_clip, search_scale, search_scale_parts
from quant.config import QuantConfig
from quant.errors import QtoolError
from quant.methods import BlockContext, BlockResult

log = logging.getLogger(__name__)

__all__ = ["CLIP_KEY", "SCALE_KEY", "apply_block", "apply_search", "check_search_file", "first_weight", "load_search",
           "quantize_block", "search_block", "search_metadata", "search_path", "weight_probe"]


def quant_spec(cfg: QuantConfig) -> QuantSpec:
    return QuantSpec(cfg.bits, cfg.group_size, cfg.sym, cfg.min_zero)


def _relative_change(out: torch.Tensor, ref: torch.Tensor, hidden: torch.Tensor) -> float:
    # Compare what the block adds to the residual stream: the residual itself can hide a broken branch.
    d_ref = (ref - hidden).float()
    return float((out.float() - ref.float()).norm() / d_ref.norm().clamp(min=1e-30))


def _backup(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` to restore it from: bfloat16 where that holds every value exactly (a bf16 model's block
    computed in float32 on the CPU: half a float32 clone's memory, 1.15 GiB less on a Qwen3-30B-A3B
    block), else a clone. ``Tensor.copy_`` (``load_state_dict``) converts it back."""
    if t.dtype == torch.float32:
        b = t.to(torch.bfloat16)
        if torch.equal(b.float(), t):
            return b
    return t.clone()


def _fold_checked(ctx: BlockContext, groups, scales: dict, ref: torch.Tensor) -> tuple[dict, dict]:
    """Fold ``scales``; if the block's output moves, keep only the groups that fold exactly."""
    block, call = ctx.block, ctx.inputs.calls[0]
    tol = 1e-3 if ref.dtype == torch.float32 else 5e-2
    original = {k: _backup(v) for k, v in block.state_dict().items()}

    def run_fold(kept):
        block.load_state_dict(original)
        s = {k: v for g in kept for k, v in group_scales(g, scales[g]).items()}
        weights = fold_scales(block, ctx.arch, s)
        return weights, s, _relative_change(run_calls(block, [call])[0], ref, call.hidden)

    weights, kept_scales, err = run_fold(groups)
    if err <= tol:
        return weights, kept_scales
    kept = []
    for g in groups:
        *_, err = run_fold(kept + [g])
        if err <= tol:
            kept.append(g)
        else:
            log.warning("block %d: AWQ drops scaling group %s -> %s: folding it changes the block's output "
                        "(relative change %.2g), so the architecture table does not fit this model",
                        ctx.index, g.prev, ", ".join(g.linears), err)
    weights, kept_scales, _ = run_fold(kept)
    return weights, kept_scales


def search_block(ctx: BlockContext, outputs: list | None = None) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """Search scales (folding them into ``ctx.block``) and clips on ``ctx.inputs``.

    Returns ``(artifacts, info, weights)``: the search results keyed
    ``<linear>.awq_scale`` / ``<linear>.awq_clip``, summary columns, and the folded
    float32 weights (``"<linear>.weight"``) of the linears the fold touched. ``outputs``, if given, gets the
    full-precision block's output ``[b, t, d]`` on each search minibatch (computed by the statistics pass).
    A MoE model's feed-forward groups (:func:`quant.awq.experts.feed_forward_groups`) take their statistics
    from the feed-forward module's recorded input (:class:`quant.awq.experts.FeedForward`), one expert at a time.
    """
    block, opts = ctx.block, ctx.cfg.awq
    probe = block_probe(block)  # before any fold: the weights the search is made on
    groups = foldable_groups(block, ctx.arch, ctx.names)
    loss = ctx.inputs.loss if opts.judge == "loss" else {}
    stats, ff, ref, probes = _statistics(ctx, groups, bool(loss), outputs)
    if "calls" in loss and probes:  # the loss gradients at the judges' outputs, on the first minibatch's windows
        attach_gradients(block, probes, ctx.inputs.calls[:1], loss["calls"])
    # Between the phases the heap's free pieces are handed back (quant.heap: why).
    heap.trim()
    scales, info = _search_scales(ctx, groups, stats, ff, probes, bool(loss))
    heap.trim()
    weights, artifacts = _fold_checked(ctx, groups, scales, ref) if groups else ({}, {})
    heap.trim()
    norm_scale = next((artifacts[f"{g.linears[0]}.{SCALE_KEY}"] for g in groups if g.feed_forward and g.kind == "norm"
                       and f"{g.linears[0]}.{SCALE_KEY}" in artifacts), None)
    if norm_scale is not None:
        ff.fold(norm_scale)
    if ff is not None and (summary := ff.token_summary())["expert tokens min/med/max"] != "-":
        info.update(summary)
    if opts.clip:
        clips = _search_clips(ctx, groups, stats, ff, weights, artifacts, loss)
        artifacts.update({f"{n}.{CLIP_KEY}": c for n, c in clips.items()})
        info["awq clip"] = _mean([float(clips[n].mean()) if n in clips else 1.0 for n in ctx.names])
        info["clips kept"] = f"{len(clips)}/{len(ctx.names)}" + ("" if ctx.inputs.accept else " untested")
    artifacts[PROBE_KEY] = probe
    return artifacts, info, weights


def _feed_forward(groups: list) -> str | None:
    """The name of the MoE feed-forward module whose recorded input the groups take their statistics from."""
    return next((g.feed_forward for g in groups if g.feed_forward), None)


def _statistics(ctx: BlockContext, groups: list, judged_by_loss: bool, outputs: list | None
                ) -> tuple[dict, FeedForward | None, torch.Tensor, dict]:
    """The statistics pass: the block run on every search minibatch, recording each linear's input statistics
    (``XᵀX`` from the first ``screen_windows`` windows, the mean |x|), a MoE feed-forward's input, and the
    judges' inputs and full-precision outputs on the first minibatch. Returns ``(stats, feed-forward recording or
    None, the block's output on the first minibatch [b, t, d], the judges' probes)``."""
    block, arch, opts = ctx.block, ctx.arch, ctx.cfg.awq
    present = {n: m for n in arch.linears if isinstance(m := module_or_none(block, n), nn.Linear)}
    judges = [j for g in groups if (j := _judge_name(g, judged_by_loss))] if opts.n_judge > 1 else []
    ff_name = _feed_forward(groups)
    current: list = []  # the token weights of the call being run, and whether its XᵀX counts
    with contextlib.ExitStack() as stack:
        stats = stack.enter_context(linear_input_stats(
            present, [g for g in arch.sequential if g[0] in present], xtx=True,
            token_weight=(lambda: current[0]) if opts.token_weighting else None, xtx_now=lambda: current[1]))
        ff = stack.enter_context(FeedForward.recording(block, ff_name)) if ff_name else None
        seen = 0  # windows before the call: XᵀX (the closed-form screen, the clip search) from the first screen_windows
        for k, call in enumerate(ctx.inputs.calls):
            current[:] = [call_weights(call, opts.token_weighting), seen < opts.screen_windows]
            seen += call.hidden.shape[0]
            # The judges see the first minibatch (judge_windows windows, calib.runner's lead): their inputs and
            # full-precision outputs are recorded.
            with probing(block, judges if k == 0 else [], lambda: current[0]) as recorded:
                # Passed on, a minibatch's inputs are not needed again (the fold check reruns the first one).
                out = run_calls(block, [call], release=outputs is not None and k > 0)[0]
            if outputs is not None:
                outputs.append(out)
            if k == 0:
                ref, probes = out, recorded
    return stats, ff, ref, probes


def _search_scales(ctx: BlockContext, groups: list, stats: dict, ff: FeedForward | None, probes: dict,
                   judged_by_loss: bool) -> tuple[dict, dict]:
    """Each group's input scale: screened in closed form (:func:`quant.awq.search.search_scale`), then, where the
    group has a judge, chosen by the output of the module it feeds (:func:`_judge_scale`). Returns
    ``({group: scale [in]}, summary columns)``."""
    block, names, opts, spec = ctx.block, ctx.names, ctx.cfg.awq, quant_spec(ctx.cfg)
    scales, ratios, proxy_ratios, proxy_gains, judged_gains = {}, [], [], [], []
    for g in groups:
        ws = {n: block.get_submodule(n).weight.detach().float() for n in g.linears if n in names}
        if g.feed_forward is None:
            st = stats[g.linears[0]]
            # Under GQA the output projection's columns of one value channel must share a scale.
            res = search_scale(torch.cat(list(ws.values())), st.xtx, tie_to_values(block, g, st.abs_mean), spec,
                               opts.n_grid)
        elif g.kind == "norm":  # every consumer of the feed-forward input, each expert under its routed tokens
            res = search_scale_parts(ff.scale_parts(block, g.linears, names, {}), ff.x.abs().mean(0), spec,
                                     opts.n_grid)
        else:  # an expert's (a shared or dense MLP's) up -> down
            x_mean, h = ff.stats(block, g.linears[0])
            res = search_scale(ws[g.linears[0]], h, x_mean, spec, opts.n_grid)
        proxy_ratios.append(f"{res.ratio:.2f}")
        if (judge := _judge_name(g, judged_by_loss)) in probes:
            res, gain = _judge_scale(block, probes[judge], ws, res, spec, opts.n_judge)
            judged_gains.append(gain)
        scales[g] = res.scale
        ratios.append(f"{res.ratio:.2f}")
        if res.proxy_gain is not None:
            proxy_gains.append(res.proxy_gain)
    info = {"awq α": _alphas(ratios), "α by proxy": _alphas(proxy_ratios), "proxy err/rtn": _mean(proxy_gains)}
    if judged_by_loss:  # the judged loss changes against RTN's, summed over the groups (mnat: 1e-3 nats per token)
        info["judged dL-rtn mnat"] = f"{1e3 * sum(judged_gains):+.2f}" if judged_gains else "-"
    else:
        info["judged err/rtn"] = _mean(judged_gains)
    return scales, info


def _search_clips(ctx: BlockContext, groups: list, stats: dict, ff: FeedForward | None, weights: dict, artifacts: dict,
                  loss: dict) -> dict[str, torch.Tensor]:
    """Each linear's per-group clipping range (:func:`quant.awq.search.search_clip`) under its input's ``XᵀX``
    as the folded block computes it, kept only where it lowers the output error on the held-out windows
    (``ctx.inputs.accept``; all kept where there are none). Returns ``{linear: clip [out, in/g]}``."""
    block, names, opts, spec = ctx.block, ctx.names, ctx.cfg.awq, quant_spec(ctx.cfg)
    ff_name = _feed_forward(groups)
    ff_names = [n for n in names if n.startswith(f"{ff_name}.")] if ff_name else []  # the feed-forward's linears
    clips, last, scaled = {}, (None, None), (None, None, None)
    for n in names:
        w = weights.get(f"{n}.weight", block.get_submodule(n).weight.detach().float())
        if n in ff_names:  # from the recorded input, as the folded block computes it; gate and up share it
            key = (n.rpartition(".")[0], n.endswith("down_proj"))
            if last[0] != key:
                last = key, ff.stats(block, n)[1]
            h = last[1]
        elif n not in stats:  # a linear outside the table (DeepSeek's latent attention): no clip search
            continue
        else:
            h = stats[n].xtx
            s = artifacts.get(f"{n}.{SCALE_KEY}")
            if s is not None:  # the input was divided by s: once per input (q/k/v share it), in one [in, in]
                if scaled[0] is not stats[n] or not torch.equal(scaled[1], s):
                    scaled = d = None  # let go of the last one first (down_proj's is 127 MB at 5632 inputs)
                    d = s[:, None] * s[None, :]
                    scaled = (stats[n], s, torch.div(h, d, out=d))
                h = scaled[2]
        clips[n] = search_clip(w, h, spec, opts.clip_grid, opts.clip_max_shrink)
    h = d = scaled = last = None  # every reference to the last scaled XᵀX, before the acceptance runs the block
    heap.trim()
    if ctx.inputs.accept:
        routed = [n for n in ff_names if ff.routed(n)]
        clips = {**_accept_clips(block, groups, [n for n in clips if n not in routed], weights, clips,
                                 ctx.inputs.accept, spec, opts.token_weighting, loss.get("accept")),
                 **_accept_routed_clips(block, ff_name, routed, weights, clips, ctx.inputs.accept, spec)}
    return clips


def _alphas(ratios: list[str]) -> str:
    """The chosen α per group; a MoE block's per-expert groups are summarised (there may be hundreds)."""
    if len(ratios) <= 12:
        return " ".join(ratios) or "-"
    values = sorted(float(r) for r in ratios)
    return f"{len(values)} groups: min {values[0]:.2f} median {values[len(values) // 2]:.2f} max {values[-1]:.2f}"


def _accept_routed_clips(block: nn.Module, ff_name: str, routed: list[str], weights: dict, clips: dict, calls,
                         spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Routed experts' clips, tested on the held-out tokens routed to each expert (:func:`quant.awq.experts.accept_expert_clips`)."""
    if not routed:
        return {}
    with torch.no_grad(), FeedForward.recording(block, ff_name) as held_out:
        run_calls(block, calls)
    return accept_expert_clips(block, held_out, routed, weights, clips, spec)


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "-"


def _judge_name(group, by_loss: bool) -> str | None:
    """The module a scaling group's candidates are judged at: its judge (attention, MLP); judging by the loss,
    a group without one (v -> o, up -> down) is judged at its one consumer's output."""
    if group.judge or not by_loss or group.feed_forward is not None or len(group.linears) != 1:
        return group.judge
    return group.linears[0]


def _judge_scale(block: nn.Module, probe, ws: dict[str, torch.Tensor], res: ScaleResult, spec: QuantSpec,
                 n_judge: int) -> tuple[ScaleResult, float]:
    """Among RTN and the proxy's best ``n_judge - 1`` scales, the one whose fake-quantized linears ``ws``
    cost least at the judge module's output (:func:`quant.awq.judge.probe_error`); with its cost relative to
    RTN's (judged by the squared error) or minus RTN's (judged by the loss, nats per token)."""
    errors = {}
    for i in res.screen(n_judge):
        s = res.candidates[i]
        errors[i] = probe_error(block, probe, {n: _fake_quantize(w * s, spec) / s for n, w in ws.items()})
    best = min(errors, key=lambda i: (errors[i], i))
    if probe.grads:
        return res.pick(best), errors[best] - errors[0]
    return res.pick(best), errors[best] / max(errors[0], 1e-30)


def _accept_clips(block: nn.Module, groups, names: list[str], weights: dict, clips: dict, calls, spec: QuantSpec,
                  weigh: bool, at_output=None) -> dict[str, torch.Tensor]:
    """The clips that lower what their judge module's output error costs on held-out ``calls``, tried one linear
    at a time: the loss change where ``at_output`` (the loss gradients at the block's output on ``calls``) is
    given, else the squared error."""
    if not names:  # a block --skip left unquantized: nothing to judge (the loss gradients need a probe)
        return {}
    by_judge: dict[str, list[str]] = {}
    for n in names:
        by_judge.setdefault(judge_of(groups, n), []).append(n)
    probes = record_probes(block, list(by_judge), calls, weigh)
    if at_output is not None:
        attach_gradients(block, probes, calls, at_output)
    kept = {}
    for judge, linears in by_judge.items():
        ws = {n: weights.get(f"{n}.weight", block.get_submodule(n).weight.detach().float()) for n in linears}
        trial = {n: _fake_quantize(w, spec) for n, w in ws.items()}
        best = probe_error(block, probes[judge], trial)
        for n in linears:
            if bool((clips[n] == 1).all()):
                continue  # nothing clipped: nothing to test
            with_clip = dict(trial, **{n: _fake_quantize(ws[n], spec, clips[n])})
            err = probe_error(block, probes[judge], with_clip)
            if err < best:
                trial, best, kept[n] = with_clip, err, clips[n]
    return kept


def quantize_block(ctx: BlockContext) -> BlockResult:
    """The ``awq`` method: search on the calibration inputs and apply, or replay ``cfg.awq.search_file``."""
    if ctx.cfg.awq.search_file:
        artifacts = load_search(ctx.cfg.awq.search_file, f"{ctx.arch.blocks}.{ctx.index}.")
        where = f"{search_path(ctx.cfg.awq.search_file)}, block {ctx.index}"
        packed = apply_block(ctx.block, ctx.names, ctx.cfg, ctx.arch, artifacts, where)
        # The replayed results are saved with the checkpoint again, so that it can be replayed in turn.
        return BlockResult(packed=packed, info={"awq": "replayed"}, artifacts=artifacts)
    if ctx.inputs is None:
        raise QtoolError("AWQ needs calibration inputs, or AWQOptions(search_file=...) to replay a search")
    fp_outputs = None if ctx.cfg.awq.quantized_inputs else []
    artifacts, info, weights = search_block(ctx, fp_outputs)
    if fp_outputs is not None:  # the next block's statistics come from the full-precision model's activations
        ctx.inputs.pass_on(ctx.inputs.calls, fp_outputs)
    packed = quantize_linears(ctx.block, ctx.names, ctx.cfg, weights, artifacts)
    return BlockResult(packed=packed, info=info, artifacts=artifacts)
