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

import torch
from torch import nn

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
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, ExpertLinears.from_fused(owner.get_submodule(child)))
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


def expert_tokens(hidden: torch.Tensor, index: torch.Tensor, e: int) -> tuple[torch.Tensor, int, bool]:
    """Expert ``e``'s statistics rows: its routed tokens, or all ``hidden`` rows where it got fewer than
    :func:`min_expert_tokens`. Returns ``(rows, routed token count, fell back)``."""
    routed = (index == e).any(dim=-1)
    n = int(routed.sum())
    if n < min_expert_tokens(hidden.shape[-1]):
        return hidden, n, True
    return hidden[routed], n, False


def token_summary(counts: list[int], fallback: list[str]) -> dict[str, str]:
    """Summary columns: routed tokens per expert (min / median / max) and the experts that fell back."""
    s = sorted(counts)
    return {"expert tokens min/med/max": f"{s[0]}/{s[len(s) // 2]}/{s[-1]}" if s else "-",
            "expert fallback": ",".join(fallback) or "-"}


def solve_experts(ctx, name: str, layer, names: set[str], packed: dict, record, rel_errors: list,
                  clips: dict | None = None) -> tuple[list[int], list[str]]:
    """GPTQ for the routed experts of ``layer`` (``name`` in the block), one expert at a time.

    The experts' inputs and routing are recorded once (:func:`routed_inputs`); each expert's
    gate and up projections are solved under the Hessian of the tokens routed to it, then its down
    projection under that of its own quantized intermediate activations. An expert routed fewer than
    :func:`min_expert_tokens` tokens takes its statistics from every calibration token
    (listed as a fallback); no expert is left unquantized. ``clips`` (AWQ+GPTQ: AWQ's clipping ranges
    by linear name) bound the groups of the projections that have one. Returns the routed token counts
    and the fallbacks.
    """
    from calib.hessian import Hessian
    from quant.gptq import _rows, gptq_quantize, hessian_error
    from quant.layers import set_quantized

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
                W = {p: getattr(expert, p).weight.detach().float() for p in todo}
                full = [f"{name}.{e}.{p}" for p in todo]
                clip = torch.cat([clips[n] for n in full]).to(h.mean.device) if clips and all(
                    n in clips for n in full) else None
                res = gptq_quantize(torch.cat(list(W.values())), h.mean, ctx.cfg, clip)
                record([f"{name}.{e}.{p}" for p in todo], res)
                rows = 0
                for p in todo:
                    full = f"{name}.{e}.{p}"
                    packed[full] = _rows(res.packed, rows, rows + W[p].shape[0])
                    rows += W[p].shape[0]
                    wq = packed[full].dequantize(torch.float32)
                    rel_errors.append(hessian_error(W[p], wq, h.mean)
                                      / max(hessian_error(W[p], torch.zeros_like(wq), h.mean), 1e-30))
                    set_quantized(ctx.block, full, packed[full])
        del x
    if fell_back:
        log.info("block %d %s: experts %s got fewer than %d routed calibration tokens; their statistics come "
                 "from every token", ctx.index, name, ", ".join(fell_back), min_expert_tokens(hidden.shape[-1]))
    return counts, fell_back


# --- AWQ over experts -------------------------------------------------------------------------------------


def _is_mlp(module: nn.Module) -> bool:
    """A gated MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with full-precision linears."""
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in PROJECTIONS) and hasattr(module, "act_fn")


def _reads_input(module: nn.Module, width: int) -> bool:
    """A router-like consumer (a router, a shared-expert gate): one 2-D ``weight [*, width]`` applied to the input."""
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == width and not list(module.children())


def feed_forward_groups(block: nn.Module, norm: str, ff: str):
    """AWQ's scaling groups of the feed-forward module ``ff`` (fed by ``norm``) of one block of a MoE model.

    * ``norm`` -> every consumer of ``ff``'s input, with one scale: each routed expert's gate and up
      projections, the shared experts' (or a dense MLP's) gate and up projections, and the routers and
      shared-expert gates, which stay in full precision but read the scaled input, so their columns are
      multiplied too (the fold stays exact); judged by ``ff``'s output;
    * each expert's (each shared or dense MLP's) ``up_proj`` -> its ``down_proj``.

    Found in the block because the number of experts, the shared experts and the dense first blocks vary by
    model. Where ``ff`` holds a module of an unknown kind the norm group is left out (its fold could not be
    shown exact); returns ``()`` where there is no such module.
    """
    from quant.arch import ScaleGroup

    module = getattr(block, ff, None)
    norm_mod = getattr(block, norm, None)
    width = getattr(getattr(norm_mod, "weight", None), "shape", (None,))[0]
    if module is None or width is None:
        return ()
    consumers, mlps, known = [], [], True
    if _is_mlp(module):
        mlps.append(ff)
    else:
        for name, child in module.named_children():
            path = f"{ff}.{name}"
            if isinstance(child, ExpertLinears):
                mlps.extend(f"{path}.{e}" for e in range(len(child)))
            elif _is_mlp(child):
                mlps.append(path)
            elif _reads_input(child, width):
                consumers.append(path)
            elif any(True for _ in child.parameters()):
                known = False
    consumers += [f"{m}.{p}" for m in mlps for p in PROJECTIONS[:2]]
    groups = [ScaleGroup(norm, tuple(consumers), "norm", judge=ff, feed_forward=ff)] if known and mlps else []
    groups += [ScaleGroup(f"{m}.up_proj", (f"{m}.down_proj",), "linear", feed_forward=ff) for m in mlps]
    return tuple(groups)


class FeedForward:
    """The calibration inputs of one feed-forward module (a MoE layer or a dense MLP) of a block, recorded
    while the block runs, and the statistics of its linears computed from them one expert at a time.

    ``x [tokens, hidden]`` float32 is the module's input; ``index[experts module] [tokens, k]`` its routing.
    Each routed expert's statistics come from the tokens routed to it, or, where it got fewer than
    :func:`min_expert_tokens`, from every token (:func:`expert_tokens`); the scale shared by all experts
    is searched on routed tokens only, so that an expert the calibration hardly reaches cannot steer it.
    """

    CHUNK = 4096  # tokens per matmul when forming a Hessian: bounds the intermediate activations held

    def __init__(self, name: str):
        self.name = name
        self._x: list[torch.Tensor] = []
        self._index: dict[str, list[torch.Tensor]] = {}
        self._n_experts: dict[str, int] = {}

    @classmethod
    def recording(cls, block: nn.Module, name: str):
        """A context manager: while the body runs ``block``, the inputs of its module ``name`` are recorded."""
        import contextlib

        ff = cls(name)
        module = block.get_submodule(name)

        def record_x(mod, args):
            ff._x.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

        def record_index(experts):
            def fn(mod, args):
                ff._index.setdefault(experts, []).append(args[1].detach())
            return fn

        @contextlib.contextmanager
        def ctx():
            handles = [module.register_forward_pre_hook(record_x)]
            for n, m in module.named_children():
                if isinstance(m, ExpertLinears):
                    ff._n_experts[f"{name}.{n}"] = len(m)
                    handles.append(m.register_forward_pre_hook(record_index(f"{name}.{n}")))
            try:
                yield ff
            finally:
                for h in handles:
                    h.remove()
        return ctx()

    @property
    def x(self) -> torch.Tensor:
        if len(self._x) > 1:
            self._x = [torch.cat(self._x)]
        return self._x[0]

    def index(self, experts: str) -> torch.Tensor:
        if len(self._index[experts]) > 1:
            self._index[experts] = [torch.cat(self._index[experts])]
        return self._index[experts][0]

    def _expert(self, mlp: str) -> tuple[str, int] | None:
        experts, _, e = mlp.rpartition(".")
        return (experts, int(e)) if experts in self._index else None

    def rows(self, mlp: str, routed_only: bool = False) -> tuple[torch.Tensor, int, bool]:
        """The input rows of the MLP ``mlp`` (an expert: ``<experts>.<e>``): ``(rows, routed tokens, fell back)``."""
        where = self._expert(mlp)
        if where is None:
            return self.x, self.x.shape[0], False
        experts, e = where
        if routed_only:
            routed = (self.index(experts) == e).any(dim=-1)
            return self.x[routed], int(routed.sum()), False
        return expert_tokens(self.x, self.index(experts), e)

    def stats(self, block: nn.Module, linear: str, rows: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean |x| [in], Σ x xᵀ [in, in])`` of the input of ``linear`` (a gate, up or down projection of
        one of this module's MLPs), float32, from ``rows`` of the MLP's input (default: :meth:`rows`)."""
        mlp_name, _, proj = linear.rpartition(".")
        mlp = block.get_submodule(mlp_name)
        if rows is None:
            rows = self.rows(mlp_name)[0]
        in_f = block.get_submodule(linear).in_features
        h = torch.zeros(in_f, in_f, device=rows.device)
        a = torch.zeros(in_f, device=rows.device)
        with torch.no_grad():
            for i in range(0, rows.shape[0], self.CHUNK):
                z = rows[i:i + self.CHUNK]
                if proj == "down_proj":
                    w = mlp.gate_proj.weight
                    z = z.to(w.dtype)
                    z = (mlp.act_fn(mlp.gate_proj(z)) * mlp.up_proj(z)).float()
                h.addmm_(z.t(), z)
                a += z.abs().sum(0)
        return a / max(rows.shape[0], 1), h

    def scale_parts(self, block: nn.Module, linears: tuple[str, ...], quantized, weights: dict):
        """``(w, Σ x xᵀ)`` per MLP among ``linears`` (a norm group's consumers), for
        :func:`quant.awq.search.search_scale_parts`: its quantized gate and up projections (float32, from
        ``weights`` or the block) under the Hessian of its routed tokens. One MLP at a time."""
        by_mlp: dict[str, list[str]] = {}
        for n in linears:
            if n in quantized:
                by_mlp.setdefault(n.rpartition(".")[0], []).append(n)
        for mlp, names in by_mlp.items():
            rows = self.rows(mlp, routed_only=True)[0]
            if rows.shape[0] == 0:
                continue
            _, h = self.stats(block, names[0], rows)
            w = torch.cat([weights.get(f"{n}.weight", block.get_submodule(n).weight).detach().float() for n in names])
            yield w, h

    def fold(self, scale: torch.Tensor) -> None:
        """The recorded input as the block computes it after its norm's outputs were divided by ``scale [hidden]``."""
        self._x = [self.x / scale.to(self.x.device)]

    def token_summary(self) -> dict[str, str]:
        """:func:`token_summary` of every routed expert of this module (routed tokens; fallback experts)."""
        counts, fell_back = [], []
        for experts, n_experts in self._n_experts.items():
            index = self.index(experts)
            for e in range(n_experts):
                n = int((index == e).any(dim=-1).sum())
                counts.append(n)
                if n < min_expert_tokens(self.x.shape[-1]):
                    fell_back.append(str(e) if len(self._n_experts) == 1 else f"{experts}.{e}")
        return token_summary(counts, fell_back)

    def routed(self, name: str) -> bool:
        """Whether the linear ``name`` belongs to a routed expert of this module."""
        return self._expert(name.rpartition(".")[0]) is not None


def accept_expert_clips(block: nn.Module, held_out: FeedForward, names: list[str], weights: dict, clips: dict,
                        spec) -> dict[str, torch.Tensor]:
    """AWQ's held-out test of the clipping ranges of routed experts' linears ``names``: a clip is kept where it
    lowers its expert's output error (``‖expert(x) - expert_q(x)‖²`` against the full-precision expert) on
    the held-out tokens routed to that expert (every held-out token where fewer were routed), tried one
    projection at a time. ``weights``: the folded float32 weights by ``"<linear>.weight"``."""
    from quant.awq.judge import swapped_weights
    from quant.awq.search import _fake_quantize

    by_expert: dict[str, list[str]] = {}
    for n in names:
        by_expert.setdefault(n.rpartition(".")[0], []).append(n)
    kept = {}
    with torch.no_grad():
        for mlp_name, linears in by_expert.items():
            x = held_out.rows(mlp_name)[0]
            mlp = block.get_submodule(mlp_name)
            x = x.to(mlp.gate_proj.weight.dtype)
            ref = mlp(x).float()
            ws = {n: weights.get(f"{n}.weight", block.get_submodule(n).weight.detach().float()) for n in linears}
            trial = {n: _fake_quantize(w, spec) for n, w in ws.items()}

            def error(trial_weights):
                with swapped_weights(block, trial_weights):
                    return float((mlp(x).float() - ref).pow(2).sum())

            best = error(trial)
            for n in linears:
                if n not in clips or bool((clips[n] == 1).all()):
                    continue
                with_clip = dict(trial, **{n: _fake_quantize(ws[n], spec, clips[n])})
                err = error(with_clip)
                if err < best:
                    trial, best, kept[n] = with_clip, err, clips[n]
    return kept
