"""AWQ's two searches as functions on tensors: no modules, no model walking.

Both minimise the *output* error of a linear on the calibration tokens. With
``H = Σ_t x_t x_tᵀ`` (``[in, in]``, summed over every calibration token) the
squared output error of replacing ``W`` by ``Ŵ`` is exactly

    Σ_t ‖(W - Ŵ) x_t‖² = Σ_rows (W - Ŵ) H (W - Ŵ)ᵀ

so each grid point costs ``out·in²`` flops whatever the number of tokens, and
the search sees every calibration token instead of a sample.

* :func:`search_scale`: per-input-channel scale ``s = mean|x| ** α`` for α on a
  grid in [0, 1); the layer computes ``Q(W·diag(s)) · (x / s)``. α = 0 is plain
  round-to-nearest, so the chosen scale never does worse than RTN on this error.
* :func:`search_clip`: per (output row, group), the fraction of the weight
  range kept, on a grid from 1 down to ``1 - max_shrink``. Groups are searched
  independently (the cross-group terms of ``H`` are left out, as in llm-awq).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from quant import qmath
from quant.config import CLIP_GRID_MAX

# Grid points and weight rows are evaluated in chunks whose float32 temporaries stay under this many
# bytes, whatever the layer's width (a 70B model's fused gate/up weight is 1.9 GB in float32).
MEMORY_BUDGET = 64 * 2**20


@dataclass(frozen=True)
class QuantSpec:
    """How the weights will be rounded (the fields of ``QuantConfig`` the searches need)."""

    bits: int
    group_size: int
    sym: bool = False
    min_zero: int = 0


@dataclass
class ScaleResult:
    scale: torch.Tensor  # [in] float32, multiplies W's columns (and divides the inputs)
    ratio: float  # the chosen α
    errors: torch.Tensor  # [n_grid] output error at each α (α = 0 is RTN)
    ratios: torch.Tensor  # [n_grid] the α grid
    candidates: torch.Tensor  # [n_grid, in] the scale at each α
    index: int | None = None  # the grid point chosen (None: a scale from elsewhere)

    def pick(self, index: int) -> ScaleResult:
        """The same search with grid point ``index`` chosen instead."""
        return ScaleResult(self.candidates[index].clone(), float(self.ratios[index]), self.errors, self.ratios,
                           self.candidates, index)

    @property
    def proxy_gain(self) -> float | None:
        """The closed-form error of the choice relative to RTN's (α = 0)."""
        if self.index is None:
            return None
        return float(self.errors[self.index] / self.errors[0].clamp(min=1e-30))

    def screen(self, n: int) -> list[int]:
        """Grid indices of α = 0 (RTN) and the ``n - 1`` other lowest errors: the candidates worth judging."""
        order = [int(i) for i in torch.argsort(self.errors, stable=True) if int(i) != 0]
        return [0] + order[:max(n - 1, 0)]


def output_error(dw: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``Σ_rows dw H dwᵀ`` over the last two dims: ``dw [..., out, in]``, ``h [in, in]`` -> ``[...]``."""
    return ((dw @ h) * dw).sum(dim=(-2, -1))


def _chunk(n_items: int, bytes_per_item: int) -> int:
    return max(1, min(n_items, MEMORY_BUDGET // max(bytes_per_item, 1)))


def _fake_quantize(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None) -> torch.Tensor:
    """``qmath.fake_quantize`` of float32 ``w``, the same arithmetic without the int32 round trip (in place)."""
    scale, zero = qmath.compute_qparams(w, spec.bits, spec.group_size, spec.sym, clip, spec.min_zero)
    scale, zero = scale[..., None], zero[..., None]
    g = qmath.effective_group_size(w.shape[1], spec.group_size)
    q = (w.reshape(w.shape[0], -1, g) / scale).round_().add_(zero).clamp_(0, 2**spec.bits - 1)
    return q.sub_(zero).mul_(scale).reshape(w.shape)


def candidate_scales(x_mean: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """``[n_ratios, in]``: ``mean|x| ** α``, normalised so that ``max·min = 1`` (llm-awq's convention)."""
    s = x_mean.float().clamp(min=1e-4)[None, :] ** ratios[:, None]
    return s / (s.amax(dim=1, keepdim=True) * s.amin(dim=1, keepdim=True)).sqrt()


def search_scale(w: torch.Tensor, h: torch.Tensor, x_mean: torch.Tensor, spec: QuantSpec, n_grid: int = 20) -> ScaleResult:
    """The input-channel scale of ``w [out, in]`` (the stacked weights of linears sharing one input).

    ``h [in, in]`` is that input's ``Σ x xᵀ``, ``x_mean [in]`` its mean ``|x|``.
    Every α of the grid is evaluated in a batch; the output error is a sum over rows, so
    rows and grid points are taken in chunks whose temporaries stay under :data:`MEMORY_BUDGET`.
    """
    return search_scale_parts([(w, h)], x_mean, spec, n_grid)


def search_scale_parts(parts: Iterable[tuple[torch.Tensor, torch.Tensor]], x_mean: torch.Tensor, spec: QuantSpec,
                       n_grid: int = 20) -> ScaleResult:
    """:func:`search_scale` for consumers of one scaled input that see different tokens of it.

    ``parts`` yields ``(w [out_i, in], h [in, in])``: the stacked weights of the consumers that see the
    same tokens, and those tokens' ``Σ x xᵀ`` (a mixture-of-experts layer: each expert's gate and up
    projections under the Hessian of the tokens routed to it). The error of a candidate is the sum over
    the parts. ``parts`` may be a generator: one part is held at a time.
    """
    ratios = torch.arange(n_grid, dtype=torch.float32) / n_grid
    scales = errors = None
    for w, h in parts:
        w, h = w.float(), h.float()
        if scales is None:
            ratios = ratios.to(w.device)
            scales = candidate_scales(x_mean.to(w.device), ratios)  # [n_grid, in]
            errors = torch.zeros(n_grid, dtype=torch.float32, device=w.device)
        out_f, in_f = w.shape
        rows = _chunk(out_f, 4 * 4 * in_f)  # ~4 float32 copies of a row per grid point
        step = _chunk(n_grid, 4 * 4 * rows * in_f)
        for r in range(0, out_f, rows):
            wr = w[r:r + rows]
            for a in range(0, n_grid, step):
                s = scales[a:a + step, None, :]  # [c, 1, in]
                dq = _fake_quantize((wr[None] * s).reshape(-1, in_f), spec).reshape(-1, wr.shape[0], in_f) / s
                errors[a:a + step] += output_error(wr[None] - dq, h)
    if scales is None:
        raise ValueError("search_scale_parts: no consumer to search a scale for")
    best = int(torch.argmin(errors))  # first minimum: ties go to the smaller α
    return ScaleResult(scales[best].clone(), float(ratios[best]), errors, ratios, scales, best)


def group_diagonal(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks of ``h [in, in]``, one per weight group: ``[n_groups, g, g]``."""
    in_f = h.shape[0]
    g = qmath.effective_group_size(in_f, group_size)
    ng = in_f // g
    return h.reshape(ng, g, ng, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def clip_ratios(n_grid: int, max_shrink: float) -> torch.Tensor:
    """Fractions of the range tried: ``1, 1 - 1/n, ...`` while the shrink stays below ``max_shrink``."""
    n = max(1, int(max_shrink * n_grid))
    return 1.0 - torch.arange(n, dtype=torch.float32) / n_grid


# Below any clip a search writes: with ``max_shrink < 1`` the grid stops at 1 - (n_grid - 2) / n_grid = 2 / n_grid
# or above (float32), and ``n_grid`` is at most CLIP_GRID_MAX. A smaller clip in a search file was put there by hand.
MIN_CLIP = 1 / CLIP_GRID_MAX


def search_clip(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Range fraction ``[out, n_groups]`` (float32, 1 = no clipping) for each group of ``w [out, in]``.

    Chooses, for every (row, group), the ratio minimising that group's output
    error ``Δw_g H_gg Δw_gᵀ``; rows are processed in chunks to bound memory.
    """
    w = w.float()
    out_f, in_f = w.shape
    g = qmath.effective_group_size(in_f, spec.group_size)
    ng = in_f // g
    hb = group_diagonal(h.float(), spec.group_size)  # [ng, g, g]
    ratios = clip_ratios(n_grid, max_shrink).to(w.device)
    r = len(ratios)
    best = torch.empty(out_f, ng, dtype=torch.float32, device=w.device)
    rows = _chunk(out_f, 4 * 4 * r * in_f)
    for a in range(0, out_f, rows):
        wc = w[a:a + rows]  # [c, in]
        c = wc.shape[0]
        clip = ratios[:, None, None].expand(r, c, ng).reshape(r * c, ng)
        dq = _fake_quantize(wc.repeat(r, 1), spec, clip)  # [r*c, in]
        d = (wc.repeat(r, 1) - dq).reshape(r, c, ng, g)
        err = torch.einsum("rcng,ngh,rcnh->rcn", d, hb, d)  # [r, c, ng]
        best[a:a + rows] = ratios[err.argmin(dim=0)]
    return best
