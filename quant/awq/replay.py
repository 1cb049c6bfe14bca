"""Replaying a saved AWQ search (:data:`quant.config.SEARCH_FILE`): each block's scales folded and its clips
applied, after checking that the results fit the block (the model, settings and weights they were made for)."""
from __future__ import annotations

import torch
from torch import nn

from quant.arch import Arch
from quant.awq.fold import (
    CLIP_KEY,
    NONE_QUANTIZED,
    SCALE_KEY,
    block_groups,
    fold_scales,
    in_width,
    module_or_none,
    producer_scale,
    skip_reason,
)
from quant.awq.search_file import (
    PROBE_KEY,
    check_block_probe,
    check_search_file,
    first_weight,
    load_search,
    search_path,
    weight_probe,
)
from quant.config import QuantConfig
from quant.errors import QtoolError
from quant.formats import PackedWeight
from quant.layers import rtn_packed, set_quantized, to_quant_linears


def quantize_linears(block: nn.Module, names: list[str], cfg: QuantConfig, weights: dict, artifacts: dict
                     ) -> dict[str, PackedWeight]:
    """RTN with the searched clips, from the folded float32 weights; the linears then compute with them."""
    packed = {}
    for n in names:
        w = weights.get(f"{n}.weight")
        if w is None:
            w = block.get_submodule(n).weight.detach().float()
        packed[n] = set_quantized(block, n, rtn_packed(w, cfg, artifacts.get(f"{n}.{CLIP_KEY}")))
    return packed


def apply_block(block: nn.Module, names: list[str], cfg: QuantConfig, arch: Arch, artifacts: dict,
                where: str = "search results") -> dict[str, PackedWeight]:
    """Replay search results on a full-precision block: fold the scales, then quantize with the clips.
    ``where`` (the file and block) begins each error's sentence."""
    check_artifacts(block, names, cfg, arch, artifacts, where)
    before = {n: float(block.get_submodule(n).weight.detach().abs().max()) for n in names}
    weights = fold_scales(block, arch, artifacts)
    check_folded(block, names, cfg, weights, before, _scaled_by(block, arch, artifacts), where)
    return quantize_linears(block, names, cfg, weights, artifacts)


def _scaled_by(block: nn.Module, arch: Arch, artifacts: dict) -> dict[str, list[str]]:
    """Each parameter a fold changes (``"mlp.up_proj.weight"``) -> the scale entries that change it: a
    linear's own (multiplying it) and that of the group whose input it produces (dividing it)."""
    by = {}
    for g in block_groups(block, arch):
        key = f"{g.linears[0]}.{SCALE_KEY}"
        if key not in artifacts:
            continue
        for n in g.linears:
            by.setdefault(f"{n}.weight", []).append(f"{n}.{SCALE_KEY}")
        for leaf in ("weight", "bias"):
            by.setdefault(f"{g.prev}.{leaf}", []).append(key)
    return by


def check_folded(block: nn.Module, names: list[str], cfg: QuantConfig, weights: dict[str, torch.Tensor],
                 before: dict[str, float], scaled_by: dict[str, list[str]], where: str = "search results") -> None:
    """Refuse scales whose folding makes a linear's weights unfit for a checkpoint: a scaled linear (``weights``,
    float32, from :func:`fold_scales`) with a weight beyond float16's largest value (65504: the formats' loaders
    dequantize into float16, vLLM's AWQ kernels compute in it; the group scales are float16 too), or whose every
    group scale ``max|w| / (2^bits - 1)`` is below float16's smallest (2^-24: all would be stored as 0), where its
    weights before folding (``before``: the largest magnitude of each linear) were not; or a divided producer
    that is no longer finite. The sentence names the entries that changed the parameter (``scaled_by``, from
    :func:`_scaled_by`). A search's own scales pass: a weight already too small (or large) for float16 before
    the fold is the model's, and the run that searched quantized it the same way."""
    from quant import qmath

    def entries(key: str) -> str:
        return " and ".join(scaled_by.get(key, [])) or "the saved scales"

    def unfit(top: float) -> bool:
        return top > qmath.FP16_MAX or 0 < top / steps < 2.0**-24

    steps = 2**cfg.bits - 1
    for n in names:
        w = weights.get(f"{n}.weight")
        if w is None:
            continue
        top = float(w.abs().max())
        if unfit(top) and not unfit(before[n]):
            raise QtoolError(f"{where}: with {entries(f'{n}.weight')}, {n}'s weights reach {top:.3g} in magnitude, so its "
                             f"float16 {'weights would be infinite' if top > 1 else f'group scales at {cfg.bits} bits would be zero'}; "
                             "no search of this model writes such scales; search again")
    for key, v in weights.items():
        if not bool(torch.isfinite(v).all()):
            raise QtoolError(f"{where}: dividing {key} by {entries(key)} gives values that are not finite; "
                             "no search of this model writes such scales; search again")


def check_artifacts(block: nn.Module, names: list[str], cfg: QuantConfig, arch: Arch, artifacts: dict,
                    where: str = "search results") -> None:
    """Refuse search results that do not fit this block and configuration (another model, group size...):
    a :class:`QtoolError` whose sentence begins with ``where``."""
    from quant import qmath

    if PROBE_KEY in artifacts:  # files from before 2026-12-04 have none
        check_block_probe(where, artifacts[PROBE_KEY], block)
    for key, t in artifacts.items():
        if key == PROBE_KEY:
            continue
        name, _, kind = key.rpartition(".")
        mod = module_or_none(block, name)
        if kind not in (SCALE_KEY, CLIP_KEY) or in_width(mod) is None or (kind == CLIP_KEY and not isinstance(mod, nn.Linear)):
            raise QtoolError(f"{where}: entry {key!r} names no linear of this model's blocks")
        if kind == SCALE_KEY:
            want = (in_width(mod),)
        else:
            want = (mod.out_features, qmath.n_groups(mod.in_features, cfg.group_size))
        if tuple(t.shape) != want:
            raise QtoolError(f"{where}: entry {key!r} has shape {tuple(t.shape)} but this model and "
                             f"--group-size {cfg.group_size} need {want}; the results come from another model or setting")
    for g in block_groups(block, arch):
        keys = [f"{n}.{SCALE_KEY}" for n in g.linears]
        found = [k for k in keys if k in artifacts]
        if not found:
            continue
        missing = [k for k in keys if k not in artifacts]
        if missing:
            raise QtoolError(f"{where}: {', '.join(g.linears)} share one input, but the file scales "
                             f"{', '.join(found)} and not {', '.join(missing)}")
        if any(not torch.equal(artifacts[k], artifacts[keys[0]]) for k in keys):
            raise QtoolError(f"{where}: {', '.join(g.linears)} get different input scales, but they share one input")
        reason = skip_reason(block, g, names)
        if reason is None:
            try:
                producer_scale(block, g, artifacts[keys[0]])
            except ValueError as e:
                reason = str(e)
        if reason == NONE_QUANTIZED:
            raise QtoolError(f"{where}: the search scales {', '.join(g.linears)}, but this run keeps them in full "
                             "precision (--skip); replay without that --skip, or search again with it")
        if reason is not None:
            raise QtoolError(f"{where}: the search scales {', '.join(g.linears)}, but that group cannot be folded here: "
                             f"{reason}")


def apply_search(model: nn.Module, results, cfg: QuantConfig) -> None:
    """Quantize a full-precision ``model`` in place with saved AWQ results (a path or a dict of tensors): its
    quantized linears become :class:`quant.modules.QuantLinear` in ``cfg``'s layout.

    Raises :class:`QtoolError` when the results were made for another model or settings, or do not fit it."""
    from quant import arch as arch_table
    from quant.layers import plan_linears

    arch = arch_table.lookup(model.config.model_type)
    source = "search results"
    if not isinstance(results, dict):
        blocks = model.get_submodule(arch.blocks)
        name = first_weight(blocks[0])
        probe = weight_probe(f"{arch.blocks}.0.{name}", blocks[0].get_parameter(name))
        linears = [n for n, m in blocks.named_modules(prefix=arch.blocks) if isinstance(m, torch.nn.Linear)]
        check_search_file(results, cfg, model.config.model_type, len(blocks), probe, arch.blocks, linears)
        source = str(search_path(results))
        results = load_search(results)
    plan = plan_linears(model, arch, cfg)
    for i, block in enumerate(model.get_submodule(arch.blocks)):
        prefix = f"{arch.blocks}.{i}."
        packed = apply_block(block, plan.quantize[i], cfg, arch, {k[len(prefix):]: v for k, v in results.items()
                                                                  if k.startswith(prefix)}, f"{source}, block {i}")
        to_quant_linears(block, packed, cfg.format)
