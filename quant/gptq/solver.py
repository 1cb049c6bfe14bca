"""The GPTQ solver (Frantar et al., 2022, "Accurate post-training quantization for generative transformers"):
functions on tensors, no model.

Columns of ``W[out, in]`` are rounded one at a time, left to right; the rounding
error of column ``j`` is spread over the columns not yet rounded so that the
layer's output on the calibration inputs changes least (the error is measured by
the Hessian ``H = XᵀX / n``). The updates use the upper Cholesky factor ``U`` of
``H⁻¹`` (``H⁻¹ = UᵀU``): row ``j`` of ``U`` is, up to a factor, exactly the OBS
update for column ``j`` given that columns ``< j`` are already fixed. Updates are
applied lazily: inside a block of ``block_size`` columns immediately, to the
columns after the block once per block, as one matrix product.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from quant import qmath
from quant.config import QuantConfig
from quant.formats import PackedWeight
from quant.layers import rtn_packed

log = logging.getLogger(__name__)
_MAX_DAMP = 1.0  # the last damping tried, as a fraction of H's mean diagonal
_DAMP_STEP = 4.0  # escalation factor when the Cholesky factorization fails


@dataclass
class GPTQResult:
    """The packed codes and how the solve went."""

    packed: PackedWeight
    damp: float | None  # damping that let the factorization succeed; None if RTN was used
    fallback: str | None = None  # why RTN was used instead, or None


def hessian_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Wq) H (W - Wq)ᵀ)``: the increase of the summed squared output error (per token)."""
    E = (W - Wq).to(H.dtype)
    return float(((E @ H) * E).sum())


def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float | None]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp * mean(diag H)``, escalating ``damp``.

    ``damp`` grows by ``_DAMP_STEP`` whenever a factorization fails, up to
    ``_MAX_DAMP``. Returns ``(U, damp used)``, or ``(None, None)`` if none worked.
    """
    if not torch.isfinite(H).all():
        return None, None
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, d
        if d >= _MAX_DAMP:
            return None, None
        log.info("Cholesky factorization failed with damp %.4g; retrying with more damping", d)
        d = min(d * _DAMP_STEP, _MAX_DAMP)


def _group_params(W: torch.Tensor, cfg: QuantConfig, clip: torch.Tensor | None = None):
    """Scale and zero ``[out, 1]`` of the columns ``W[out, g]`` of one group (range times ``clip[out, 1]``)."""
    return qmath.compute_qparams(W, cfg.bits, -1, cfg.sym, clip, cfg.min_zero)


_RANGE_GRID = torch.linspace(1.0, 0.5, 21)  # range factors tried by the range search, 1 first
_RANGE_CHUNK = 7  # candidates evaluated at once


def searched_range(Wg: torch.Tensor, cfg: QuantConfig, hdiag: torch.Tensor) -> torch.Tensor:
    """Per row of one group ``Wg[out, g]``, the range factor (``clip[out, 1]``, float32) of ``_RANGE_GRID``
    whose rounding (``qmath.compute_qparams``) has the least error: ``Σ_j hdiag_j Δw_j²`` (``hdiag [g]``, the
    Hessian's diagonal over the group's columns) where ``cfg.gptq.range_search`` is "hessian", else
    ``Σ_j |Δw_j|^2.4`` ("mse", the GPTQ authors' reference code). Ties keep the larger range.
    """
    out_f, g = Wg.shape
    Wg = Wg.float()
    errs = []
    for cands in _RANGE_GRID.to(Wg.device).split(_RANGE_CHUNK):
        k = len(cands)
        W = Wg.repeat(k, 1)  # [k * out, g], candidate-major
        clip = cands.repeat_interleave(out_f)[:, None]
        s, z = qmath.compute_qparams(W, cfg.bits, -1, cfg.sym, clip, cfg.min_zero)
        d = (qmath.dequantize(qmath.quantize(W, s, z, cfg.bits, -1), s, z, -1) - W).abs()
        err = (d.square() * hdiag.float()).sum(1) if cfg.gptq.range_search == "hessian" else d.pow(2.4).sum(1)
        errs.append(err.view(k, out_f))
    best = torch.cat(errs).argmin(0)  # the first minimum: the largest range among equals
    return _RANGE_GRID.to(Wg.device)[best][:, None]


def _columns_now(Wt, W1, Err1, U, i1, i, c0, c1):
    """Columns ``c0..c1`` of the weight as they are now, lazy updates included, as rows ``[c1 - c0, out]``.

    Inside the current block (``W1``, rows from ``i1``) they are up to date; after
    it, ``Wt`` still lacks the updates of the block's first ``i`` columns.
    """
    i2 = i1 + W1.shape[0]
    inside = W1[c0 - i1 : min(c1, i2) - i1]
    if c1 <= i2:
        return inside
    after = Wt[i2:c1] - U[i1 : i1 + i, i2:c1].t() @ Err1[:i]
    return torch.cat([inside, after])


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, clip: torch.Tensor | None = None,
                  importance: torch.Tensor | None = None) -> GPTQResult:
    """Quantize ``W[out, in]`` with GPTQ under the Hessian ``H[in, in]`` (``XᵀX / n``).

    Uses ``cfg.bits``, ``cfg.group_size``, ``cfg.sym`` and ``cfg.gptq`` (shrink,
    damp, block_size, act_order, static_groups, range_search). Group parameters come from
    ``qmath.compute_qparams`` on the group's columns as the solver reaches them
    (already corrected for earlier errors; the range shrunk by :func:`searched_range`
    unless ``range_search`` is "minmax"), so each column is rounded with exactly
    the float16 scale the checkpoint stores. Works in float64 if ``W`` is float64,
    else float32. Inputs that never fire (``H[i, i] = 0``) get weight 0.

    ``clip`` (optional, ``[out, n_groups]``, natural groups) shrinks each group's
    range as in ``qmath.compute_qparams``: AWQ's clipping search, for AWQ+GPTQ.
    It needs the natural group order, so not act-order without static groups.

    ``importance`` (optional, ``[in]``) replaces ``diag(H)`` as act-order's ranking:
    row slices of one linear solved under different Hessians (the value heads) then
    share one column order, hence one ``g_idx``.
    """
    if clip is not None and cfg.gptq.act_order and not cfg.gptq.static_groups:
        raise ValueError("a clip per natural group cannot be used with act-order groups; use static groups")
    if W.device.type != "cpu":
        return _gptq_quantize(W, H, cfg, clip, importance)
    with _cpu_solver_settings():
        return _gptq_quantize(W, H, cfg, clip, importance)


@contextlib.contextmanager
def _cpu_solver_settings():
    """One thread and subnormals flushed to zero while the solver runs on the CPU; restored after.

    The solver is thousands of small ops: with two threads on a busy machine each op waits
    for the other thread to be scheduled (measured on SmolLM2 down_proj: 21 s with 2 threads,
    0.4 s with 1). Real Hessians make the updates underflow into subnormal floats, ~10x
    slower on CPUs (19.8 s vs 2.4 s); flushing them changes nothing at float32 precision.
    """
    threads = torch.get_num_threads()
    flushed = torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)


def _gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, clip: torch.Tensor | None,
                   importance: torch.Tensor | None) -> GPTQResult:
    opts = cfg.gptq
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dtype).clone()
    H = H.detach().to(device=W.device, dtype=dtype).clone()
    out_f, in_f = W.shape
    g = qmath.effective_group_size(in_f, cfg.group_size)
    if in_f % g:
        raise ValueError(f"in_features {in_f} is not divisible by group_size {g}")

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if opts.shrink:  # (1 - β) H + β diag(H): the correlations of the calibration text trusted in part
        diag = torch.diagonal(H).clone()
        H.mul_(1.0 - opts.shrink)
        torch.diagonal(H).add_(opts.shrink * diag)
    if opts.static_groups:  # parameters of the natural groups, fixed before any error is spread
        sclip = clip
        if sclip is None and opts.range_search != "minmax":
            d = torch.diagonal(H)
            sclip = torch.cat([searched_range(W[:, c : c + g], cfg, d[c : c + g]) for c in range(0, in_f, g)], dim=1)
        s_static, z_static = qmath.compute_qparams(W, cfg.bits, cfg.group_size, cfg.sym, sclip, cfg.min_zero)
    perm = None
    if opts.act_order:  # largest diagonal first: the most important columns are rounded while most are free
        rank = torch.diagonal(H) if importance is None else importance.to(device=H.device, dtype=H.dtype)
        perm = torch.argsort(rank, descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]

    hdiag = torch.diagonal(H).clone()  # before damping: the range search weighs by it
    U, damp = inverse_hessian_cholesky(H, opts.damp)
    if U is None:
        reason = "the Hessian is not finite" if not torch.isfinite(H).all() else "Cholesky failed at every damping"
        return GPTQResult(rtn_packed(W if perm is None else W[:, torch.argsort(perm)], cfg, clip), None, reason)

    # The loop runs on Wᵀ [in, out], so that column j of W is the contiguous row j.
    Wt = W.t().contiguous()
    Qt = torch.zeros(in_f, out_f, dtype=torch.int32, device=W.device)
    scale = torch.zeros(out_f, in_f // g, dtype=torch.float32, device=W.device)
    zero = torch.zeros_like(scale)
    for i1 in range(0, in_f, opts.block_size):
        i2 = min(i1 + opts.block_size, in_f)
        W1 = Wt[i1:i2].clone()  # [b, out]
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if opts.static_groups:
                gi = (col if perm is None else int(perm[col])) // g
                s, z = s_static[:, gi : gi + 1], z_static[:, gi : gi + 1]
            elif col % g == 0:
                Wg = _columns_now(Wt, W1, Err1, U, i1, i, col, col + g).t()
                if clip is not None:
                    gclip = clip[:, col // g : col // g + 1]
                elif opts.range_search != "minmax":
                    gclip = searched_range(Wg, cfg, hdiag[col : col + g])
                else:
                    gclip = None
                s, z = _group_params(Wg, cfg, gclip)
                scale[:, col // g : col // g + 1], zero[:, col // g : col // g + 1] = s, z
            w = W1[i][:, None]  # [out, 1]
            q = qmath.quantize(w, s, z, cfg.bits, -1)
            err = ((w - qmath.dequantize(q, s, z, -1).to(dtype)) / U1[i, i])[:, 0]
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # OBS update of the block's remaining columns
            Err1[i] = err
            Qt[col] = q[:, 0]
        Wt[i2:] -= U[i1:i2, i2:].t() @ Err1  # the lazy batch update of every later column
    Q = Qt.t().contiguous()

    if opts.static_groups:
        scale, zero = s_static, z_static
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if not opts.static_groups:  # permuted column j was in group j // g
            g_idx = (inv // g).to(torch.int32)
    packed = PackedWeight(q=Q, scale=scale, zero=zero, bits=cfg.bits, group_size=cfg.group_size, g_idx=g_idx)
    return GPTQResult(packed, damp)


def solve_value_heads(W: torch.Tensor, heads: list[torch.Tensor], cfg: QuantConfig, clip: torch.Tensor | None,
                       first_row: int = 0, H: torch.Tensor | None = None, importance: torch.Tensor | None = None
                       ) -> tuple[PackedWeight | None, float]:
    """The value projection ``W`` solved head by head, each under its own Hessian, with one act-order column order.

    In a fused qkv projection the rows before ``first_row`` (queries and keys) are solved
    under ``H`` (``XᵀX``), whose diagonal then also ranks the columns for act-order; a
    separate v_proj ranks them by the heads' summed diagonals, or by ``importance`` where
    given (q, k and v that a checkpoint stores fused share one column order). Returns the
    packed weight and the largest damping used; None if any part fell back to round-to-nearest.
    """
    n = len(heads)
    rows = (W.shape[0] - first_row) // n
    if not cfg.gptq.act_order:
        importance = None
    elif importance is None:
        importance = torch.diagonal(H) if first_row else sum(torch.diagonal(Hh) for Hh in heads)
    slices = [(slice(0, first_row), H)] if first_row else []
    slices += [(slice(first_row + h * rows, first_row + (h + 1) * rows), Hh) for h, Hh in enumerate(heads)]
    parts, damp = [], 0.0
    for sl, Hs in slices:
        res = gptq_quantize(W[sl], Hs.to(W.device), cfg, None if clip is None else clip[sl].to(W.device), importance)
        if res.fallback:
            return None, damp
        parts.append(res.packed)
        damp = max(damp, res.damp)
    return PackedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                        torch.cat([p.zero for p in parts]), cfg.bits, cfg.group_size, parts[0].g_idx), damp
