"""Folding AWQ scales into a block: the producer's output is divided by ``s``, the consumers' columns multiplied.

For a scaling group ``prev -> linears`` with scale ``s [in]``:

* kind "norm":   ``norm(x) * (offset + w)`` becomes ``norm(x) * (offset + w) / s``, i.e.
  ``w <- (offset + w) / s - offset`` (``offset`` is 1 for gemma's RMSNorm) and ``b <- b / s``;
* kind "linear": ``prev``'s output rows and bias are divided by ``s``;
* kind "values": the same for the value projection, under grouped-query attention
  too. Query head ``q`` reads key/value head ``q // r`` (``r`` query heads per
  key/value head), so output-projection column ``q·d + j`` reads value channel
  ``(q // r)·d + j`` (``d`` the head size): ``s`` must be equal on the ``r``
  columns that read one value channel (:func:`tie_to_values` makes a statistic
  so), and that channel's row is divided by it;
* each consumer: ``W <- W · diag(s)``.

Before quantization the block then computes the same function (up to float rounding).
All arithmetic is done in float32 on copies and written back once, so the fold is
bit-reproducible whatever the dtype the block is held in.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from quant.arch import Arch, ScaleGroup, value_heads
from quant.awq.experts import feed_forward_groups

log = logging.getLogger(__name__)

SCALE_KEY = "awq_scale"  # "<linear>.awq_scale": [in] float32, that linear's input was divided by it
CLIP_KEY = "awq_clip"  # "<linear>.awq_clip": [out, n_groups] float32, range fraction kept


def module_or_none(block: nn.Module, name: str) -> nn.Module | None:
    """``block.get_submodule(name)``, or ``None`` where the block has no such module."""
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def block_groups(block: nn.Module, arch: Arch) -> tuple[ScaleGroup, ...]:
    """The scaling groups of ``block``: the table's, and for a MoE model those of its feed-forward module,
    found in the block (:func:`quant.awq.experts.feed_forward_groups`)."""
    if arch.feed_forward is None:
        return arch.scale_groups
    return arch.scale_groups + feed_forward_groups(block, *arch.feed_forward)


def in_width(module: nn.Module | None) -> int | None:
    """The input width of a consumer a scale can be folded into: a full-precision ``nn.Linear``, or a
    module that applies one 2-D ``weight [out, in]`` to its input (a MoE router); else None."""
    if isinstance(module, nn.Linear):
        return module.in_features
    w = getattr(module, "weight", None)
    if isinstance(w, nn.Parameter) and w.ndim == 2 and not list(module.children()):
        return w.shape[1]
    return None


NONE_QUANTIZED = "none of its linears is quantized"


def skip_reason(block: nn.Module, group: ScaleGroup, quantized: list[str]) -> str | None:
    """Why ``group``'s scale cannot (or need not) be folded in ``block``; ``None`` when it can."""
    prev = module_or_none(block, group.prev)
    if prev is None:
        return f"{group.prev} is not in the block"
    widths = [in_width(module_or_none(block, n)) for n in group.linears]
    if any(w is None for w in widths):
        return f"one of {', '.join(group.linears)} is not a full-precision linear"
    if not any(n in quantized for n in group.linears):
        return NONE_QUANTIZED
    in_f = set(widths)
    if len(in_f) != 1:
        return f"{', '.join(group.linears)} read inputs of different widths {sorted(in_f)}"
    width = in_f.pop()
    if group.kind in ("linear", "values"):
        if not isinstance(prev, nn.Linear):
            return f"{group.prev} is not a full-precision linear"
        if prev.out_features == width:
            return None
        if group.kind == "linear" or width % prev.out_features or value_heads(block, group.prev) is None:
            return (f"{group.prev} has {prev.out_features} outputs but {', '.join(group.linears)} read {width} "
                    f"inputs, so no exact fold exists")
        return None
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
        return f"{group.prev} has no per-channel weight of size {width} to fold into"
    return None


def _kv_layout(block: nn.Module, group: ScaleGroup, width: int) -> tuple[int, int, int]:
    """``(key/value heads, query heads per key/value head, head size)`` of a "values" group read ``width`` wide."""
    out_f = block.get_submodule(group.prev).out_features
    if out_f == width:  # no GQA: one query head per value channel, whatever the head size
        return 1, 1, out_f
    heads = value_heads(block, group.prev)
    return heads.n_kv_heads, width // out_f, heads.head_dim


def tie_to_values(block: nn.Module, group: ScaleGroup, stat: torch.Tensor) -> torch.Tensor:
    """A per-input-channel statistic of the consumers, averaged over the columns that read one value channel.

    Scales computed channel by channel from the result fold exactly; for any other
    kind of group, and without GQA, it is ``stat`` unchanged.
    """
    if group.kind != "values":
        return stat
    n_kv, r, d = _kv_layout(block, group, stat.numel())
    return stat.reshape(n_kv, r, d).mean(dim=1, keepdim=True).expand(n_kv, r, d).reshape(-1)


def producer_scale(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> torch.Tensor:
    """The scale of ``prev``'s output rows for the consumers' input scale ``s``; ``ValueError`` if none exists."""
    if group.kind != "values":
        return s
    n_kv, r, d = _kv_layout(block, group, s.numel())
    s3 = s.reshape(n_kv, r, d)  # [kv head, query head of its group, channel]
    if not torch.equal(s3, s3[:, :1].expand_as(s3)):
        raise ValueError(f"the scale of {', '.join(group.linears)} differs between query heads that read the same "
                         f"value channel of {group.prev}, so it cannot be folded into {group.prev}")
    return s3[:, 0].reshape(-1)


@functools.lru_cache(maxsize=256)
def _log_once(message: str) -> None:
    # The same group is skipped in every block for the same reason: say it once.
    log.info(message)


def foldable_groups(block: nn.Module, arch: Arch, quantized: list[str]) -> list[ScaleGroup]:
    """The table's scaling groups that can be folded here; the others are logged and left out."""
    groups = []
    for group in block_groups(block, arch):
        reason = skip_reason(block, group, quantized)
        if reason is None:
            groups.append(group)
        elif reason != "none of its linears is quantized":
            _log_once(f"AWQ skips scaling group {group.prev} -> {', '.join(group.linears)}: {reason}")
    return groups


def _param_names(block: nn.Module, groups: list[ScaleGroup]) -> list[str]:
    names = []
    for group in groups:
        for mod in (group.prev, *group.linears):
            for p in ("weight", "bias"):
                if getattr(block.get_submodule(mod), p, None) is not None:
                    names.append(f"{mod}.{p}")
    return list(dict.fromkeys(names))


def fold_scales(block: nn.Module, arch: Arch, scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold every group whose consumers have an ``<linear>.awq_scale`` in ``scales`` into ``block``.

    Returns the folded float32 values of every parameter touched (``"<module>.weight"``...): the weights to
    quantize. The block's parameters are updated in their own dtype; a float32 parameter (a block computed in
    float32 on the CPU) is folded in place and returned itself, so that it is not held twice, and it changes
    when the block's linear is given its quantized weight. ``ValueError`` (from :func:`producer_scale`) leaves
    the block unchanged.
    """
    groups = [g for g in block_groups(block, arch) if f"{g.linears[0]}.{SCALE_KEY}" in scales]
    folds = []  # every scale checked before any parameter changes
    for group in groups:
        s = scales[f"{group.linears[0]}.{SCALE_KEY}"].float().to(block.get_parameter(f"{group.prev}.weight").device)
        folds.append((group, s, producer_scale(block, group, s)))
    # .float() is the parameter itself where it is float32 already: folded in place
    params = {n: block.get_parameter(n).detach().float() for n in _param_names(block, groups)}
    with torch.no_grad():
        for group, s, sp in folds:
            pw, pb = params[f"{group.prev}.weight"], params.get(f"{group.prev}.bias")
            if group.kind == "norm":
                pw.add_(arch.norm_offset).div_(sp).sub_(arch.norm_offset)
            else:
                pw.div_(sp[:, None])
            if pb is not None:
                pb.div_(sp)
            for name in group.linears:
                params[f"{name}.weight"].mul_(s[None, :])
        for n, v in params.items():
            p = block.get_parameter(n)
            if p.dtype != torch.float32:
                p.copy_(v.to(p.dtype))
    return params


def group_scales(group: ScaleGroup, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The artifacts of one group's scale: the same ``[in]`` vector under each consumer's name."""
    return {f"{name}.{SCALE_KEY}": scale.clone() for name in group.linears}  # safetensors refuses shared memory
