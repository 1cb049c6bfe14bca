"""AWQ over a mixture-of-experts block (issue 17): the feed-forward module's scaling groups, its recorded
calibration inputs and per-expert statistics, and the held-out test of routed experts' clips.

The experts are the per-expert ``nn.Linear`` modules of :class:`quant.moe.ExpertLinears`; their routing and
the fallback for experts that calibration hardly reaches are :mod:`quant.moe`'s (shared with GPTQ).
"""
from __future__ import annotations

import torch
from torch import nn

from quant import moe

def _is_mlp(module: nn.Module) -> bool:
    """A gated MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with full-precision linears."""
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in moe.PROJECTIONS) and hasattr(module, "act_fn")


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
            if isinstance(child, moe.ExpertLinears):
                mlps.extend(f"{path}.{e}" for e in range(len(child)))
            elif _is_mlp(child):
                mlps.append(path)
            elif _reads_input(child, width):
                consumers.append(path)
            elif any(True for _ in child.parameters()):
                known = False
    consumers += [f"{m}.{p}" for m in mlps for p in moe.PROJECTIONS[:2]]
    groups = [ScaleGroup(norm, tuple(consumers), "norm", judge=ff, feed_forward=ff)] if known and mlps else []
    groups += [ScaleGroup(f"{m}.up_proj", (f"{m}.down_proj",), "linear", feed_forward=ff) for m in mlps]
    return tuple(groups)


class FeedForward:
    """The calibration inputs of one feed-forward module (a MoE layer or a dense MLP) of a block, recorded
    while the block runs, and the statistics of its linears computed from them one expert at a time.

    ``x [tokens, hidden]`` float32 is the module's input; ``index[experts module] [tokens, k]`` its routing.
    Each routed expert's statistics come from the tokens routed to it, or, where it got fewer than
    :func:`quant.moe.min_expert_tokens`, from every token (:func:`quant.moe.expert_tokens`); the scale
    shared by all experts is searched on routed tokens only, so that an expert the calibration hardly
    reaches cannot steer it.
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
                if isinstance(m, moe.ExpertLinears):
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
            mask, n, _ = moe.routed_tokens(self.index(experts), e, self.x.shape[-1])
            return self.x[mask], n, False
        return moe.expert_tokens(self.x, self.index(experts), e)

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
        """:func:`quant.moe.token_summary` of every routed expert of this module (routed tokens; fallback experts)."""
        counts, fell_back = [], []
        for experts, n_experts in self._n_experts.items():
            for e in range(n_experts):
                _, n, fb = moe.routed_tokens(self.index(experts), e, self.x.shape[-1])
                counts.append(n)
                if fb:
                    fell_back.append(str(e) if len(self._n_experts) == 1 else f"{experts}.{e}")
        return moe.token_summary(counts, fell_back)

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
