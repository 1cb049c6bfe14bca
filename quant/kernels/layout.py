"""The CUDA kernels' in-memory weight layout, "qtool-tile32", and its repacking.

Checkpoint tensors (AWQ "gemm", GPTQ) stay the contract and the state_dict;
this layout is built from them once per layer (``repack``) and cached. The
exact definition, with the reason for each choice, is at the kernels'
definition in ``csrc/w4a16_common.cuh``; in short, for ``W[n, k] = (q - z) * s``:

* ``qweight``: int32 ``[K/32, N/32, 32, 4]``: tile ``(kt, nb)`` holds
  ``k in [32kt, 32kt+32)``, ``n in [32nb, 32nb+32)``; lane ``l = 4g + t``,
  word ``w = 2kh + nh``, nibble ``i`` holds
  ``n = 32nb + 16nh + g + 8*((i % 4) // 2)``, ``k = 32kt + 16kh + 2t + i // 4 + 8*(i % 2)``;
* ``scales``: ``[G, N]`` in the activation dtype, ``zeros``: uint8 ``[G, N]``
  (or ``None`` when every zero is 8), columns permuted within each block of 32:
  column ``32nb + 4g + j`` holds feature ``32nb + 8j + g``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quant import qmath
from quant.formats import PackedWeight

TILE = 32
SYMMETRIC_ZERO = 8


def _fragment_offsets() -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) offsets inside a 32x32 tile of every code, indexed ``[lane, word, nibble]``."""
    lane = torch.arange(32).view(32, 1, 1)
    word = torch.arange(4).view(1, 4, 1)
    nib = torch.arange(8).view(1, 1, 8)
    g, t = lane // 4, lane % 4
    kh, nh = word // 2, word % 2
    n_off = 16 * nh + g + 8 * ((nib % 4) // 2)
    k_off = 16 * kh + 2 * t + nib // 4 + 8 * (nib % 2)
    return n_off.expand(32, 4, 8), k_off.expand(32, 4, 8)


# Column c = 4g + j of a permuted 32-block holds feature 8j + g.
_COL_PERM = torch.tensor([8 * (c % 4) + c // 4 for c in range(TILE)])
_COL_INV = torch.argsort(_COL_PERM)


@dataclass
class Tile32Weight:
    """One linear layer's weight in the kernels' layout (see module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int  # effective: per channel is K
    out_features: int
    in_features: int


def layout_check(n: int, k: int, bits: int, group_size: int, has_g_idx: bool) -> str | None:
    """Why a weight cannot be put in the tile32 layout, or None."""
    if bits != 4:
        return f"bits={bits}: the CUDA kernels take 4-bit weights only"
    if has_g_idx:
        return "act-order g_idx is not supported by the CUDA kernels"
    if n % TILE or k % TILE:
        return f"N={n} and K={k} must be divisible by {TILE}"
    g = qmath.effective_group_size(k, group_size)
    if g % TILE or k % g:
        return f"group_size {g} must be a multiple of {TILE} dividing K={k}"
    return None


def _permute_cols(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    # [G, N] -> [G, N] with each block of 32 columns reordered.
    rows, n = t.shape
    return t.reshape(rows, n // TILE, TILE)[..., perm.to(t.device)].reshape(rows, n)


def repack(pw: PackedWeight, dtype: torch.dtype) -> Tile32Weight:
    """Canonical codes (``q [N, K]``, ``scale``/``zero`` ``[N, G]``) -> tile32 layout."""
    n, k = pw.q.shape
    reason = layout_check(n, k, pw.bits, pw.group_size, pw.g_idx is not None)
    if reason:
        raise ValueError(reason)
    n_off, k_off = (o.to(pw.q.device) for o in _fragment_offsets())
    # [N, K] -> [K/32, N/32, 32 (k), 32 (n)] -> gather -> [K/32, N/32, 32 lanes, 4 words, 8 nibbles]
    tiles = pw.q.reshape(n // TILE, TILE, k // TILE, TILE).permute(2, 0, 3, 1)
    codes = tiles[:, :, k_off, n_off].to(torch.int64)
    shifts = 4 * torch.arange(8, device=codes.device)
    words = (codes << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    zero = pw.zero.to(torch.int64)
    zeros = None
    if not bool((zero == SYMMETRIC_ZERO).all()):
        zeros = _permute_cols(zero.t().contiguous(), _COL_PERM).to(torch.uint8)
    return Tile32Weight(
        qweight=words.contiguous(),
        scales=_permute_cols(pw.scale.t().contiguous().to(dtype), _COL_PERM).contiguous(),
        zeros=zeros if zeros is None else zeros.contiguous(),
        group_size=qmath.effective_group_size(k, pw.group_size),
        out_features=n,
        in_features=k,
    )


def unpack(kw: Tile32Weight) -> PackedWeight:
    """Tile32 layout -> canonical codes; the exact inverse of :func:`repack` (scales in their stored dtype)."""
    kt, nb = kw.qweight.shape[:2]
    n_off, k_off = (o.to(kw.qweight.device) for o in _fragment_offsets())
    shifts = 4 * torch.arange(8, device=kw.qweight.device)
    codes = (kw.qweight.to(torch.int64)[..., None] >> shifts) & 0xF  # [K/32, N/32, 32, 4, 8]
    tiles = torch.empty(kt, nb, TILE, TILE, dtype=torch.int32, device=codes.device)
    tiles[:, :, k_off, n_off] = codes.to(torch.int32)
    q = tiles.permute(1, 3, 0, 2).reshape(nb * TILE, kt * TILE)
    scale = _permute_cols(kw.scales, _COL_INV).t().contiguous()
    if kw.zeros is None:
        zero = torch.full_like(scale, SYMMETRIC_ZERO, dtype=torch.int32)
    else:
        zero = _permute_cols(kw.zeros, _COL_INV).t().contiguous().to(torch.int32)
    return PackedWeight(q=q.contiguous(), scale=scale, zero=zero, bits=4, group_size=kw.group_size)
