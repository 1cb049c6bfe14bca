"""Which linears get quantized; a method's result held as fake-quantized weights; converting to ``QuantLinear``.

Methods compute and formats store: a method gives each linear its quantized weight as a
:class:`PackedWeight` (one rounding convention for every layout) and leaves the linear
computing with the dequantized weight (:func:`set_quantized`), so the next block's
calibration inputs come from plain matmuls, bit-identical to the packed layer's reference
path. Packing into the checkpoint's layout happens once, when the block is written
(:func:`to_quant_linears`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quant import qmath
from quant.arch import Arch, spelling
from quant.config import QuantConfig
from quant.errors import QtoolError
from quant.formats import PackedWeight
from quant.modules import QuantLinear

log = logging.getLogger(__name__)


@dataclass
class LinearPlan:
    """Per block: the linears to quantize (names relative to the block) and what is skipped, with why."""

    quantize: list[list[str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # full module name -> reason
    spell: Callable[[str], str] = field(default=str, repr=False)  # a module name as the checkpoint writes it

    @property
    def n_quantized(self) -> int:
        return sum(len(b) for b in self.quantize)

    def keep_together(self, i: int, linears: tuple[str, ...], prefix: str, why: str) -> None:
        """Linears the checkpoint stores as one tensor (a fused q, k, v) are quantized all or none: where
        block ``i`` keeps one of them in full precision, it keeps all of them."""
        kept = [n for n in linears if n not in self.quantize[i]]
        if not kept or len(kept) == len(linears):
            return
        for n in linears:
            if n in self.quantize[i]:
                self.quantize[i].remove(n)
                self.skipped[prefix + n] = f"{why}, with {self.spell(prefix + kept[0])}, which stays in full precision"
                if self.spell(prefix + n) != self.spell(prefix + kept[0]):  # one tensor in the checkpoint: said once
                    log.warning("%s stays in full precision: %s", self.spell(prefix + n), self.skipped[prefix + n])

    def check_loaded_block(self, i: int, block: nn.Module, prefix: str, cfg: QuantConfig) -> None:
        """Checks that need block ``i``'s values (the plan was made on the meta device): a linear whose group
        scale float16 cannot hold stays in full precision, with a warning."""
        for name in list(self.quantize[i]):
            reason = _scale_overflow(block.get_submodule(name), cfg)
            if reason:
                self.quantize[i].remove(name)
                self.skipped[prefix + name] = reason
                log.warning("%s stays in full precision: %s", self.spell(prefix + name), reason)


ROUTER = "a router gate, kept in full precision by design"


def skip_matches(name: str, entry: str) -> bool:
    """Whether ``--skip`` ``entry`` names the linear ``name`` (its full module name): the whole name, a dotted
    tail of it (``mlp.down_proj``), or a module that holds it (``mlp.shared_expert``, ``model.layers.3``,
    ``experts.7``) — any run of whole dotted parts."""
    return f".{entry}." in f".{name}."


def _skip_reason(full_name: str, lin: nn.Linear, cfg: QuantConfig) -> str | None:
    if any(skip_matches(full_name, s) for s in cfg.skip):
        return "skipped on request"
    g = lin.in_features if cfg.group_size == -1 else cfg.group_size
    if lin.in_features % g:
        return f"in_features {lin.in_features} is not divisible by group size {g}"
    problem = cfg.format.layer_error(lin.in_features, lin.out_features, cfg.bits)
    if problem:
        return problem
    return None if lin.weight.is_meta else _scale_overflow(lin, cfg)


def _scale_overflow(lin: nn.Linear, cfg: QuantConfig) -> str | None:
    # Scales are stored as float16: a group spanning more than 65504 * (2^bits - 1) would be clamped.
    span = 2 * float(lin.weight.detach().abs().max())
    if span / (2**cfg.bits - 1) > qmath.FP16_MAX:
        return (f"weights up to {span / 2:.3g} in magnitude need a scale beyond float16's {qmath.FP16_MAX:.0f} "
                f"at {cfg.bits} bits")
    return None


def plan_linears(model: nn.Module, arch: Arch, cfg: QuantConfig) -> LinearPlan:
    """Every ``nn.Linear`` inside the decoder blocks, minus those that cannot or must not be quantized."""
    plan = LinearPlan(spell=spelling(model, module=True))
    blocks = model.get_submodule(arch.blocks)
    all_names: list[tuple[str, str]] = []  # (full name, name inside the block)
    for i, block in enumerate(blocks):
        names = []
        for name, mod in block.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            full = f"{arch.blocks}.{i}.{name}"
            all_names.append((full, name))
            if any(name == k or name.endswith("." + k) for k in arch.keep_full):
                plan.skipped[full] = ROUTER
                continue
            reason = _skip_reason(full, mod, cfg)
            if reason:
                plan.skipped[full] = reason
            else:
                names.append(name)
        plan.quantize.append(names)
    # lm_head: never quantized; the closest names spelled as the checkpoint stores them
    _check_skip_names([s for s in cfg.skip if s not in arch.never_quantize], all_names, plan.spell)
    if plan.n_quantized == 0:
        reasons = sorted(set(plan.skipped.values()))
        raise QtoolError(f"no linear layer can be quantized with these settings ({'; '.join(reasons)})")
    _warn_kept({full: reason for full, reason in plan.skipped.items() if reason != ROUTER}, plan.spell)
    return plan


def _warn_kept(kept: dict[str, str], spell=str) -> None:
    """One warning per kept name pattern and reason: a MoE model's experts would otherwise give hundreds of lines
    (``model.layers.*.mlp.experts.*.down_proj (96 linears) stay in full precision: ...``). Names as ``spell``
    gives them (the checkpoint's: InternLM2's q, k and v are one ``attention.wqkv``)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for full, reason in kept.items():
        name = spell(full)
        names = groups.setdefault((re.sub(r"\.\d+\.", ".*.", name), reason), [])
        if name not in names:  # InternLM2's q, k and v: one name
            names.append(name)
    for (pattern, reason), names in groups.items():
        if len(names) == 1:
            log.warning("%s stays in full precision: %s", names[0], reason)
        else:
            log.warning("%s (%d linears) stay in full precision: %s", pattern, len(names), reason)


def _check_skip_names(skip, linear_names: list[tuple[str, str]], spell=str) -> None:
    """Every ``--skip`` name must match a linear of the decoder blocks (:func:`skip_matches`: e.g.
    ``mlp.down_proj``, ``model.layers.3.mlp.down_proj`` or a module such as ``mlp.shared_expert``); a typo is
    refused with close matches, named as ``spell`` gives them (the checkpoint's: InternLM2's ``feed_forward.w2``)."""
    import difflib

    full_names = [full for full, _ in linear_names]
    stored = sorted({spell(full) for full in full_names})
    tails = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in stored})  # names inside a block: "mlp.down_proj"
    for s in skip:
        if not s.strip(" ."):
            raise QtoolError(f"--skip {s!r}: an empty name matches no linear; give a name such as {tails[-1]} "
                             "or a module such as mlp")
        if any(skip_matches(n, s) for n in full_names):
            continue
        close = difflib.get_close_matches(s, tails + stored, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"the linears are named like {', '.join(tails[:4])}"
        raise QtoolError(f"--skip {s}: no linear layer of the decoder blocks has this name; {hint}")


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse weights with NaN or inf: quantizing them would write garbage silently."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise QtoolError(f"{where}: weight {name} holds NaN or inf values; the model is damaged, fix it first")


def qparams(w: torch.Tensor, cfg: QuantConfig, clip: torch.Tensor | None = None):
    return qmath.compute_qparams(w, cfg.bits, cfg.group_size, cfg.sym, clip, cfg.min_zero)


def rtn_packed(w: torch.Tensor, cfg: QuantConfig, clip: torch.Tensor | None = None) -> PackedWeight:
    """Round-to-nearest codes of ``w[out, in]`` (the baseline every method is compared with)."""
    w = w.detach().float()
    scale, zero = qparams(w, cfg, clip)
    q = qmath.quantize(w, scale, zero, cfg.bits, cfg.group_size)
    return PackedWeight(q=q, scale=scale, zero=zero, bits=cfg.bits, group_size=cfg.group_size)


def set_quantized(block: nn.Module, name: str, pw: PackedWeight) -> PackedWeight:
    """``block.<name>`` (an ``nn.Linear``) computes with ``pw``'s dequantized weight from now on; returns ``pw``.

    The weight is dequantized in float32 (exact: integer codes times float16 scales) and copied into the
    linear's dtype, which is what the packed layer's reference path computes."""
    lin = block.get_submodule(name)
    with torch.no_grad():
        lin.weight.copy_(pw.dequantize(torch.float32).to(lin.weight.device))
    return pw


def to_quant_linears(module: nn.Module, packed: dict[str, PackedWeight], fmt) -> None:
    """Swap each ``module.<name>`` of ``packed`` for a :class:`QuantLinear` holding its weight packed in
    ``fmt`` (a :class:`quant.formats.Format` or its name), keeping the linear's bias and device."""
    for name, pw in packed.items():
        lin = module.get_submodule(name)
        qlayer = QuantLinear.from_packed(pw, lin.bias, fmt)
        module.set_submodule(name, qlayer.to(lin.weight.device))
