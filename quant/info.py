"""What a quantized checkpoint holds, read from config.json and safetensors headers only (the model built on the
meta device to check them: :func:`quant.loading.check_checkpoint`)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from quant import folder, qmath
from quant.arch import layout_of
from quant.checkpoint import QTOOL_META, checkpoint_headers, tensor_index
from quant.errors import QtoolError
from quant.formats.compat import Written, declared_kept, expert_layer, in_block, readers, skip_pattern
from quant.formats.spec import read_spec, side_file_problems

log = logging.getLogger(__name__)


@dataclass
class CheckpointInfo:
    path: str
    model_type: str
    fmt: str  # the layout's name: "awq" (AutoAWQ gemm), "gptq" (v1), "gptq_v2"
    bits: int
    group_size: int
    sym: bool  # False: zero points stored (a GPTQ config that leaves sym out counts as symmetric)
    act_order: bool
    n_quantized: int
    skipped: list[str]
    checkpoint_bytes: int
    fp16_bytes: int  # the same model with every tensor in float16
    method: str | None  # from qtool.json when we wrote it
    loaders: dict[str, str | None]  # loader -> None where it reads this checkpoint right, else why not

    @property
    def ratio(self) -> float:
        return self.fp16_bytes / self.checkpoint_bytes if self.checkpoint_bytes else float("nan")


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    from quant.loading import check_checkpoint

    spec = read_spec(path)
    config = folder.read_config(path)
    index = tensor_index(path)
    check_checkpoint(path)  # every tensor the model needs, none it does not use, each of the right shape
    fp16_elems = 0
    n_quantized = 0
    shapes = {k: shape for k, (_, shape, _) in checkpoint_headers(index).items()}
    for k, shape in shapes.items():
        prefix, _, leaf = k.rpartition(".")
        if leaf == "scales" and f"{prefix}.qweight" in shapes:
            n_quantized += 1
            groups, out_f = shape
            in_f = _in_features(spec, shapes[f"{prefix}.qweight"])
            if groups != qmath.n_groups(in_f, spec.group_size):
                raise QtoolError(f"{path}: {prefix}.scales holds {groups} groups for {in_f} input features, but "
                                 f"quantization_config says group size {spec.group_size}")
            fp16_elems += in_f * out_f
        elif leaf in ("qweight", "qzeros", "g_idx") and f"{prefix}.scales" in shapes:
            continue
        else:
            n = 1
            for d in shape:
                n *= d
            fp16_elems += n
    quantized = [k.rpartition(".")[0] for k in shapes if k.endswith(".qweight")]
    kept, keys = _kept(spec, shapes, quantized, _routers(config.get("model_type")))
    sym, declared = spec.sym, spec.format.name
    if spec.format.quant_method == "gptq":  # v1 or v2, symmetric or not: as load reads them, from the zero points
        from quant.gptq_checkpoints import read_qzeros, resolve_convention, stored_sym_convention

        qzeros = dict(read_qzeros(index, quantized))
        spec = resolve_convention(spec, qzeros.items(), str(path))
        if sym is None:
            sym = all(stored_sym_convention(z, spec.bits) == spec.format.name for z in qzeros.values())
    moe = any(map(expert_layer, quantized))
    layout = layout_of(config)  # a remote-code family (InternLM2), read by the loaders with a class for it only
    family = config.get("model_type") if layout is not None and layout.remote_code else None
    loaders = readers(Written(spec.format.name, spec.bits, sym, spec.act_order, spec.group_size,
                              skip_pattern(kept, quantized), moe, keys,
                              declared if declared != spec.format.name else None, family))
    if spec.format.quant_method == "gptq" and not spec.act_order:
        permuted = _permuted_g_idx(index, quantized, spec.group_size)
        if permuted:  # vLLM and LMDeploy take the sequential order from desc_act false; qtool reads g_idx
            loaders = {name: why or f"{permuted}.g_idx is not the sequential group order while desc_act is false: "
                       "a loader that trusts desc_act reads the groups in the wrong order"
                       for name, why in loaders.items()}
    # settings an older tool's side file holds: loaders that read config.json alone, or the side file first, differ
    side = side_file_problems(path, read_spec(path))  # the spec as declared, before the stored zero points decide
    loaders = {name: problem or side.get(name) for name, problem in loaders.items()}
    outside = sorted(n for n in quantized if not in_block(n))  # qtool never writes one: another tool's lm_head
    if outside:  # transformers' AWQ loader keeps lm_head in full precision, optimum's GPTQ converts the blocks only
        loaders = {name: why or f"{outside[0]} is stored quantized, outside the decoder blocks: the table covers "
                   "the blocks' linears only, and a quantized head is not established for this loader"
                   for name, why in loaders.items()}
    method = None
    meta = Path(path) / QTOOL_META
    made = _qtool_record(meta) if meta.is_file() else {}
    if made:
        report = made.get("report") if isinstance(made.get("report"), dict) else {}
        config_made = made.get("config") if isinstance(made.get("config"), dict) else {}
        method = report.get("method") or config_made.get("method")  # AWQ+GPTQ: "gptq+awq"
        check = report.get("model_check")
        chosen = check.get("kept") if isinstance(check, dict) else None
        if method and chosen and chosen != method:
            from quant.model_check import describe

            method += f" (the whole-model check kept {describe(chosen, method)})"
    return CheckpointInfo(
        path=str(path), model_type=config.get("model_type", "?"), fmt=spec.format.name,
        bits=spec.bits, group_size=spec.group_size, sym=sym, act_order=spec.act_order, n_quantized=n_quantized, skipped=kept or list(spec.skipped),
        checkpoint_bytes=folder.folder_bytes(path, ("*.safetensors",)), fp16_bytes=2 * fp16_elems, method=method,
        loaders=loaders,
    )


def _permuted_g_idx(index: dict, quantized: list[str], group_size: int) -> str | None:
    """The first quantized layer whose stored ``g_idx`` is not ``input channel // group size``, or None."""
    import torch

    from quant.formats.gptq import natural_g_idx
    from quant.gptq_checkpoints import read_leaf

    return next((name for name, g_idx in read_leaf(index, quantized, "g_idx")
                 if not torch.equal(g_idx.to(torch.int32), natural_g_idx(g_idx.numel(), group_size))), None)


def _qtool_record(meta: Path) -> dict:
    """The ``"qtool"`` object of a checkpoint's qtool.json (how qtool made it), or ``{}`` where the file is damaged
    or another tool's: it only adds the method to the description, so a bad one is logged, not fatal."""
    try:
        made = json.loads(meta.read_text()).get("qtool")
    except (OSError, ValueError, AttributeError) as e:
        log.warning("%s: not read (%s); the method that made the checkpoint is not shown", meta, type(e).__name__)
        return {}
    return made if isinstance(made, dict) else {}


def _routers(model_type) -> tuple[str, ...]:
    """The names (suffixes) of the linears a family keeps in full precision by design, its MoE routers, which every
    loader keeps so without being told."""
    from quant import arch

    try:
        return arch.lookup(model_type).keep_full
    except QtoolError:
        return ()


def _kept(spec, shapes: dict, quantized: list[str], routers: tuple[str, ...]) -> tuple[list[str], frozenset[str]]:
    """The linears of the decoder blocks stored in full precision (declared by an exclusion key or not: a loader
    that is not told builds a quantized layer there and misses its weight), routers aside, and the keys that
    declare every one of them."""
    plain = [m for m in (k.removesuffix(".weight") for k, shape in shapes.items() if k.endswith(".weight")
                         and len(shape) == 2) if in_block(m)]
    leaves = {r.rpartition(".")[2] for r in routers}  # by leaf: a layout stores them under its own parents
    plain = [m for m in plain if m.rpartition(".")[2] not in leaves]
    declared = declared_kept(spec.config, plain)
    kept = sorted(plain)
    return kept, frozenset(k for k, d in declared.items() if d >= set(kept))


def _in_features(spec, qweight_shape) -> int:
    if spec.format.quant_method == "awq":
        return qweight_shape[0]  # [in, out/8]
    return qweight_shape[0] * 32 // spec.bits  # [in*b/32, out]
