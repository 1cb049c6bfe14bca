"""The whole-model check: of the models one pass can build, keep the one whose next-token loss is lowest.

A block that :func:`quant.guard.rtn_guard` finds closer to its full-precision self
than RTN can still make the *model* worse: errors that each block keeps small add up
along the residual stream in directions no per-block measure weighs. So the pipeline
also checks the whole model (:func:`check_model`): the next-token loss on the guard
windows (and on each kind of check text) of the model as quantized against each
alternative whole model, carried through the same pass by :class:`Alternatives`:

- the all-RTN model, from each block's RTN version that the guard keeps;
- for AWQ+GPTQ, plain GPTQ (without AWQ's scales);
- the one-module candidates (:func:`partial_blocks`): the method's linears in one of
  the block's modules only, attention or MLP, and the base model's in the other (RTN's
  for AWQ and GPTQ, plain GPTQ's for AWQ+GPTQ), so that a method that helps in one
  module and hurts in the other is not thrown away whole.

Of those not worse than all-RTN on any other kind of text checked (worse: above it by more than
``NOISE_Z`` standard errors of the window-by-window difference, so that a difference inside the
windows' own spread does not throw away a model that is better on average), it keeps the one
whose loss, averaged over the kinds of text (the guard windows' and each checked kind,
weighed alike), is lowest: ranked on the guard windows alone, the candidate fitted
hardest to the calibration text wins by a hair there and loses on the others
(AWQ+GPTQ against plain GPTQ on Qwen2.5-Coder-1.5B, benchmarks/RESULTS.md, issue 20).

The losses come from the model's own final norm and head applied to the last block's
hidden states (:func:`window_nlls`, :func:`logits_from_final_hidden`), so soft-capped
logits and tied embeddings count as the model computes them.
"""
from __future__ import annotations

import copy
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from calib.collectors import BlockCall, record_block_calls, take_first_hidden
from calib.runner import CALIB_BATCH, BlockInputs, move, run_calls
from quant.arch import module_of
from quant.methods import BlockContext, BlockResult
from quant.modules import QuantLinear

log = logging.getLogger(__name__)

# A candidate is refused on a kind of check text where its loss is above all-RTN's by more than NOISE_Z standard
# errors of the window-by-window difference: a difference inside the windows' own spread is no evidence either way.
NOISE_Z = 1.0
PARTIAL = "@"  # "<method>@<module>": the whole-model check's candidate with the method's linears in one module only


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
    hidden = [move(take_first_hidden(calls), device, dtype) for calls in per_batch]
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
            logits = logits_from_final_hidden(model, blocks, ids, h)
            out.append(float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device))))
            del logits
    return out


def _cast_to_compute(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The block's floating tensors outside its QuantLinears (whose packed tensors and scales keep their dtype)."""
    quantized = {name for name, m in block.named_modules() if isinstance(m, QuantLinear)}
    return [(n, t) for n, t in [*block.named_parameters(), *block.named_buffers()]
            if t.is_floating_point() and n.rsplit(".", 1)[0] not in quantized]


def logits_from_final_hidden(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, final: torch.Tensor,
                             grad: bool = False) -> torch.Tensor:
    """The model's logits ``[b, seq, vocab]`` for ``ids [b, seq]`` when its last block outputs ``final``
    (``[b, seq, hidden]``; every block bypassed); with ``grad``, differentiable in ``final``."""
    last = len(blocks) - 1

    def through(i):
        def forward(hidden, *args, **kwargs):
            return final.to(device=hidden.device, dtype=hidden.dtype) if i == last else hidden
        return forward

    for i, block in enumerate(blocks):
        block.forward = through(i)
    try:
        with torch.set_grad_enabled(grad):
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for block in blocks:
            del block.forward


def modules_of(names) -> dict[str, list[str]]:
    """The block's quantized linears (names relative to the block) by the block's module that holds them, its
    first path component: ``{"self_attn": [q, k, v, o], "mlp": [gate, up, down]}`` (InternLM2's ``attention``
    and ``feed_forward`` are loaded under these names; a MoE block's experts are under its ``mlp``)."""
    by: dict[str, list[str]] = {}
    for n in names:
        by.setdefault(module_of(n), []).append(n)
    return by


def partial_name(label: str, module: str) -> str:
    """The whole-model check's candidate with ``label``'s linears in ``module`` and RTN's in the rest."""
    return f"{label}{PARTIAL}{module}"


def partial_module(name: str, label: str) -> str | None:
    """The module whose linears candidate ``name`` takes from method ``label`` (None: not such a candidate)."""
    return name[len(label) + 1:] if name.startswith(f"{label}{PARTIAL}") else None


# The model each method's one-module candidates take their other modules from: AWQ's and GPTQ's are weighed against
# RTN, AWQ+GPTQ's against plain GPTQ (its other candidate).
PARTIAL_BASE = {"awq": "rtn", "gptq": "rtn", "gptq+awq": "gptq"}


def describe(name: str, label: str) -> str:
    """A whole-model candidate in words, for the summary: ``"all-RTN"``, ``"awq in self_attn, RTN elsewhere"``,
    ``"gptq+awq in mlp, plain GPTQ elsewhere"``."""
    if name == "rtn":
        return "all-RTN"
    module = partial_module(name, label)
    elsewhere = "plain GPTQ" if PARTIAL_BASE.get(label) == "gptq" else "RTN"
    return f"{label} in {module}, {elsewhere} elsewhere" if module else name


def partial_blocks(ctx: BlockContext, result: BlockResult, base: nn.Module, rtn_block: nn.Module) -> dict[str, nn.Module]:
    """The method's block with one module's linears the method's and the others' ``base``'s (RTN's for AWQ and GPTQ,
    plain GPTQ's for AWQ+GPTQ: :data:`PARTIAL_BASE`), one per module of the block (:func:`modules_of`; none where the
    block has one module): the whole-model check's candidates between the method's model and the base model. The
    method's error is not spread evenly: on Qwen2.5-Coder-0.5B calibrated on Python, AWQ in attention alone closed
    7% / 15% of the RTN gap on Wikipedia / code, AWQ in both modules −8% / 20% (worse than RTN on Wikipedia, so the
    check kept all-RTN: 0% / 0%); on Qwen2.5-Coder-1.5B AWQ in both modules was worse than RTN on fiction and AWQ in
    attention alone kept (13% / 16%; benchmarks/RESULTS.md, issue 20).

    Each is the packed ``base`` (new modules sharing its tensors: no memory but the swapped modules') with
    the module's linears packed from ``result.packed`` (with the method's biases) and, where AWQ folded a scale
    into a producer outside them (a norm, a router that reads it), that producer and those consumers copied
    from the method's block, so that the block computes the method's module exactly. The candidates are those of
    ``ctx.modules`` (the model's, so that every block has each one): where a module has no quantized linear in
    this block (``--skip``), its candidate's block is ``base``. Where the guard kept RTN for the block (the
    method's model has ``rtn_block`` there), every candidate's block is ``rtn_block``. Returns ``{}`` (no
    candidates) where the model has one such module, or (logged) where an AWQ scaling group spans two modules."""
    parts = modules_of(ctx.names)
    modules = ctx.modules or tuple(parts)
    if len(modules) < 2:
        return {}
    if result.block is not None:  # the guard kept RTN: so does every candidate, in this block
        return {partial_name(ctx.cfg.label, m): rtn_block for m in modules}
    from quant.awq.fold import block_groups, module_or_none

    owner = {}  # every module a scale reaches (its producer, its consumers) -> the block's module it belongs to
    for g in block_groups(ctx.block, ctx.arch) if ctx.cfg.folds_scales else ():
        within = set(map(module_of, g.linears)) | ({module_of(g.prev)} if g.kind != "norm" else set())
        if len(within) != 1:
            log.info("block %d: an AWQ scale of %s spans %s, so no model has %s in one module only: the whole-model "
                     "check weighs none", ctx.index, ", ".join(g.linears), " and ".join(sorted(within)), ctx.cfg.label)
            return {}
        owner.update(dict.fromkeys((g.prev, *g.linears), within.pop()))
    names = set(ctx.names)
    out = {}
    for module in modules:
        linears = parts.get(module, [])
        if not linears or any(n not in result.packed for n in linears):
            out[partial_name(ctx.cfg.label, module)] = base
            continue
        # New modules that share base's tensors: the modules swapped in below are new ones, the rest is base's.
        block = copy.deepcopy(base, {id(t): t for t in (*base.parameters(), *base.buffers())})
        for n in linears:
            lin = ctx.block.get_submodule(n)
            block.set_submodule(n, QuantLinear.from_packed(result.packed[n], lin.bias, ctx.cfg.format).to(lin.weight.device))
        for n, m in owner.items():  # the producers and unquantized consumers a scale of this module changed
            if m == module and n not in names and (src := module_or_none(ctx.block, n)) is not None:
                block.set_submodule(n, copy.deepcopy(src))
        out[partial_name(ctx.cfg.label, module)] = block
    return out


class Alternatives:
    """The whole-model check's other candidates (:attr:`BlockResult.alternatives`: the all-RTN model, plain
    GPTQ beside AWQ+GPTQ, the one-module candidates), carried along the one pass. Per name: ``parts``, per block,
    the part that holds that candidate's version of the block (``"block"``: the method's own; a candidate's name:
    its own, or the candidate written before it with the same block; None: not yet written), and ``stream``, the
    guard and check windows through that model's blocks so far. ``final``: the method's own model's last hidden
    states on them. Saved with the progress record.

    Candidates whose blocks so far are the same modules share one stream: each block runs once per distinct pair
    of (block, input stream). Where the guard keeps RTN, the one-module candidates' block is RTN's (and the
    method's): while it does, from the first block on, they cost all-RTN's stream and forwards only, and where it
    does in every block, the check scores them once with all-RTN."""

    def __init__(self, record: dict, saved_list, n_blocks: int):
        self.n_blocks = n_blocks
        self.parts: dict[str, list] = record.get("alternatives", {})
        shares = record.get("alternative_streams", {})  # name -> the name its stream was saved under
        saved = {name: saved_list(f"stream.{name}.") for name in self.parts if shares.get(name, name) == name}
        self.stream = {name: saved[shares.get(name, name)] for name in self.parts}
        self.final = saved_list("final.")
        self.pending: dict[str, nn.Module] = {}  # name -> its packed version of the block in hand, until written

    def advance(self, i: int, alternatives: dict, inputs: BlockInputs | None, block) -> None:
        """Run the guard and check windows through block ``i`` of each alternative (the first block starts
        from the windows' own inputs), and through the method's block where it is the last."""
        if not alternatives or inputs is None or not inputs.guard:
            return
        calls = inputs.guard + inputs.check
        # An alternative that an earlier block lacks, or this one, cannot be checked: its stream is let go.
        live = {name: b for name, b in alternatives.items() if all(self.parts.get(name, [None])[:i])}
        for name in self.parts.keys() - live.keys():
            self.stream[name] = None
        runs = {(id(b), id(self.stream.get(name))) for name, b in live.items()}
        readers = {}  # input stream -> how many distinct runs still read it: the last one may write over it
        for _, s in runs:
            readers[s] = readers.get(s, 0) + 1
        done: dict[tuple, list[torch.Tensor]] = {}
        for name, alt_block in live.items():
            own = self.stream.get(name)  # None in the first block, which reads the windows' own inputs
            key = (id(alt_block), id(own))
            self.parts.setdefault(name, [None] * self.n_blocks)
            self.pending[name] = alt_block
            if key in done:  # the same block on the same inputs: the same outputs
                self.stream[name] = done[key]
                continue
            readers[id(own)] -= 1  # the last run that reads a stream writes its outputs over it
            start = own or [c.hidden for c in calls]
            # Packed, it stays packed: a dense copy beside the method's dense block would double the peak.
            self.stream[name] = done[key] = run_calls(
                alt_block, [BlockCall(h, c.args, c.kwargs) for h, c in zip(start, calls)],
                release=own is not None and readers[id(own)] == 0, hold_dense=False)
        if i == self.n_blocks - 1:
            self.final = run_calls(block, calls)

    def shares(self) -> dict[str, str]:
        """name -> the first name holding the same stream (itself where none before it does)."""
        first: dict[int, str] = {}
        return {name: first.setdefault(id(s), name) for name, s in self.stream.items()}

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors of the progress record: ``final`` and each distinct stream once (:meth:`shares`)."""
        out = {f"final.{j}": h.cpu() for j, h in enumerate(self.final or [])}
        for name, owner in self.shares().items():
            if owner == name:
                out.update({f"stream.{name}.{j}": h.cpu() for j, h in enumerate(self.stream[name] or [])})
        return out

    def complete(self) -> dict[str, list[torch.Tensor]]:
        """Each alternative with a version of every block: name -> its last hidden states on the guard and check
        windows."""
        if self.final is None:
            return {}
        return {name: self.stream[name] for name, parts in self.parts.items() if all(parts)}


def check_model(model, blocks, guard_ids: torch.Tensor, check_ids: torch.Tensor, kinds: list[str], finals,
                 alternatives: dict, cfg) -> dict:
    """Whole-model guard: the next-token loss (:func:`window_nlls`) of the method's model and of
    each alternative model on the guard windows and on each kind of check windows.

    A candidate is eligible where its loss is not above the all-RTN model's on any kind of check text by more
    than ``NOISE_Z`` standard errors of the window-by-window difference (:func:`paired_difference`; RTN always
    is eligible); ``kept`` names the eligible one with the lowest ``score``: its loss averaged over the kinds
    of text, the guard windows one kind and each of ``kinds`` another, weighed alike (the guard loss alone
    where no other kind is checked; on a tie the method's, then all-RTN; a NaN loss is never kept). Returns
    ``{"method": label, "nll": the method's guard loss, "alternatives": {name: guard loss}, "rtn_nll":
    all-RTN's, "kinds": {kind: {candidate: loss}}, "score": {candidate: mean over kinds},
    "worse_than_rtn": {candidate: [kinds]}, "above_rtn": {candidate: {kind: (mean difference, standard error)}},
    "kept": name}``; losses in nats per token.
    """
    t = time.perf_counter()
    n_guard = len(guard_ids)
    candidates = {cfg.label: finals, **alternatives}
    batches = [b for ids in (guard_ids, check_ids) if len(ids) for b in ids.split(CALIB_BATCH)]  # as streamed
    per_window, by_stream = {}, {}  # candidates sharing a stream (:class:`Alternatives`) are scored once
    for name, h in candidates.items():
        if id(h) not in by_stream:
            by_stream[id(h)] = window_nlls(model, blocks, batches, h)
        per_window[name] = by_stream[id(h)]
    guard = {name: _mean(nll[:n_guard]) for name, nll in per_window.items()}
    n = cfg.check_windows
    span = {kind: slice(n_guard + k * n, n_guard + (k + 1) * n) for k, kind in enumerate(kinds)}
    by_kind = {kind: {name: _mean(nll[w]) for name, nll in per_window.items()} for kind, w in span.items()}
    # Each candidate's loss minus all-RTN's, window by window, on each kind: the mean and its standard error
    above = {name: {kind: paired_difference(nll[w], per_window["rtn"][w]) for kind, w in span.items()}
             for name, nll in per_window.items() if name != "rtn" and "rtn" in per_window}
    worse = {name: [kind for kind, (mean, se) in diffs.items() if not mean <= NOISE_Z * se]
             for name, diffs in above.items()}
    score = {name: _mean([loss, *(by_kind[kind][name] for kind in kinds)]) for name, loss in guard.items()}
    kept, best = cfg.label, math.inf
    # The method's first, then all-RTN: an alternative must be strictly lower, so that a candidate equal to one of
    # them (a one-module candidate whose module is RTN's in every block) is not kept and reported as another model.
    for name in sorted(score, key=lambda n: (n != cfg.label, n != "rtn")):
        if not worse.get(name) and score[name] < best:
            kept, best = name, score[name]
    if math.isinf(best):  # every candidate NaN or worse than RTN somewhere, and no RTN model to fall back on
        kept = cfg.label
    log.info("whole-model check on %d held-out windows: loss %s; %s: keeping %s (%.1f s)", n_guard,
             ", ".join(f"{v:.4f} ({k})" for k, v in guard.items()),
             "; ".join(f"{kind} " + ", ".join(f"{v:.4f} ({k})" for k, v in losses.items())
                       for kind, losses in by_kind.items()) or "no other kinds of text checked",
             kept, time.perf_counter() - t)
    return {"method": cfg.label, "nll": guard[cfg.label], "rtn_nll": guard.get("rtn", math.nan),
            "alternatives": {k: v for k, v in guard.items() if k != cfg.label}, "kinds": by_kind, "score": score,
            "worse_than_rtn": {k: v for k, v in worse.items() if v}, "above_rtn": above, "kept": kept}


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """The mean of ``a[i] - b[i]`` and its standard error (the sample standard deviation of the differences over
    the square root of their number; 0 for fewer than two), in the units of ``a``; NaN where either holds one."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    if not d:
        return math.nan, math.nan
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
