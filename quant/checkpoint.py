"""Writing and reading quantized checkpoints (AWQ "gemm" or GPTQ layout, safetensors + config.json)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from quant import folder, model_io
from quant.config import QuantConfig
from quant.errors import QtoolError
from quant.modules import QuantLinear
from quant.qmath import FP16_MAX, FP16_OVERFLOW
from quant.ranges import abs_max, converted

log = logging.getLogger(__name__)

QTOOL_META = "qtool.json"  # how the checkpoint was made: method, calibration, sizes (ours only)


def quantization_config(cfg: QuantConfig, kept: list[str], quantized: list[str]) -> dict:
    """The ``quantization_config`` block of config.json that vLLM, transformers, GPTQModel and LMDeploy read:
    the layout's keys and the layers ``kept`` in full precision in every form those loaders read
    (:func:`quant.formats.compat.exclusion_keys`); ``quantized``: the quantized linears' names."""
    from quant.formats.compat import exclusion_keys

    solver = {"true_sequential": cfg.gptq.true_sequential, "damp_percent": cfg.gptq.damp,
              "static_groups": cfg.gptq.static_groups}
    qc = cfg.format.quantization_config(cfg.bits, cfg.group_size, cfg.sym, cfg.act_order, solver)
    return {**qc, **exclusion_keys(cfg.format.quant_method, kept, quantized)}




def _largest_unquantized(src, quantized: set[str], bits: int) -> tuple[str, float]:
    """(name, max |x|) of the source's floating tensor with the largest magnitude among those that stay
    unquantized: every tensor but the weights named in ``quantized``, except those whose group scale
    float16 cannot hold at ``bits`` (they will stay in full precision, :mod:`quant.layers`). Tensors
    outside the blocks come from the loaded skeleton; others are read a slice at a time."""
    loaded = src.model.state_dict()
    best = ("", 0.0)
    for name in src.index:
        t = loaded.get(name)
        if t is None or t.is_meta:  # read a slice at a time: an unloaded embedding never whole in memory
            if not (src.stored_dtype_of(name) or torch.int32).is_floating_point:
                continue
            m = src.abs_max(name)
        elif t.is_floating_point() and t.numel():
            m = abs_max(t.detach())
        else:
            continue
        if name in quantized and 2 * m / (2**bits - 1) <= FP16_MAX:
            continue
        if not m <= best[1]:
            best = (name, m)
    return best


def output_dtype(cfg: QuantConfig, src, quantized: set[str]) -> torch.dtype:
    """The dtype of the checkpoint's unquantized tensors, decided from the source before any block is
    written. ``auto``: a half-precision source keeps its dtype; a float32 one becomes float16 (AWQ/GPTQ
    convention) unless float16 cannot hold it: bfloat16 for tensors beyond float16's range (float32 for
    those beyond bfloat16's too) and for Gemma-family models (their activations exceed it in float16).
    ``quantized``: the weight names (``...q_proj.weight``) planned to be written packed. Reads every source
    tensor once where float16 is in question (a float32 source, or ``--dtype float16``); a half-precision
    source is not read. ``--dtype bfloat16`` of a float32 source is not scanned (no trained model holds
    values near 3.4e38; a read of the whole source would cost every such run): a tensor beyond its range is
    refused as it is written (:func:`checkpoint_tensors`)."""
    model_type = getattr(src.model.config, "model_type", "")
    if cfg.dtype == "auto" and src.dtype in (torch.float16, torch.bfloat16):
        return src.dtype
    if cfg.dtype not in ("auto", "float16"):
        return model_io.torch_dtype(cfg.dtype)
    if cfg.dtype == "auto" and model_type.startswith("gemma"):
        log.warning("writing the checkpoint in bfloat16, not float16: %s activations overflow it "
                    "(pass --dtype to choose)", model_type)
        return torch.bfloat16
    name, big = _largest_unquantized(src, quantized, cfg.bits)
    if big < FP16_OVERFLOW:  # what is below 65520 rounds to float16's 65504 at most
        return torch.float16
    if cfg.dtype == "float16":
        raise QtoolError(f"--dtype float16: {src.stored_name(name)} holds values up to {big:.6g}, beyond float16's "
                         f"{FP16_MAX:.0f} (they would be inf); use --dtype bfloat16 or float32")
    wider = torch.bfloat16 if torch.tensor(big).to(torch.bfloat16).isfinite() else torch.float32
    log.warning("writing the checkpoint in %s, not float16: %s holds values up to %.3g (pass --dtype to choose)",
                str(wider).removeprefix("torch."), src.stored_name(name), big)
    return wider


def checkpoint_tensors(module: nn.Module, dtype: torch.dtype, prefix: str = "", exclude: str | None = None,
                       only: set[str] | None = None, spell=str, why: str | None = None) -> dict[str, torch.Tensor]:
    """``module``'s state dict as it is written, names prefixed with ``prefix``: tied parameters once, scales
    float16, other floats in ``dtype``; names under ``exclude`` (the decoder blocks, written on their own)
    left out; with ``only``, just those names.

    Only parameters that are the same object under two names (``lm_head`` tied to ``embed_tokens``)
    are written once; transformers re-ties them on load. Buffers are always written, even when they
    share storage (a GPTQ ``g_idx`` may be one tensor held by several layers). Raises QtoolError
    where a value is beyond ``dtype``'s range (a tensor the source scan could not see, e.g. a norm AWQ
    scaled, or any with ``--dtype bfloat16`` of a float32 source), naming it as ``spell`` gives a name (the
    source's own names, e.g. :meth:`quant.source.SourceModel.stored_name`), after ``why`` (what chose ``dtype``:
    ``--dtype bfloat16``) where given.
    """
    out, storages = {}, set()
    quant_prefixes = {n + "." for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    tied = {name for name, _ in module.named_parameters(remove_duplicate=False)} - {
        name for name, _ in module.named_parameters()}
    for name, t in module.state_dict().items():
        if name in tied or (exclude and name.startswith(exclude + ".")) or (only is not None and name not in only):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf == "scales" and parent + "." in quant_prefixes:
            t = t.to(torch.float16)
        elif t.is_floating_point():
            t = converted(t.detach(), dtype, spell(prefix + name), why=why)
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[prefix + name] = t
    return out


def write_metadata(cfg: QuantConfig, source_dir: str | os.PathLike, dst: Path, kept: list[str],
                   quantized: list[str], meta: dict, dtype: torch.dtype) -> None:
    """Everything a loader needs besides the tensors, into ``dst``: config.json with its
    ``quantization_config``, the tokenizer and generation files, and qtool.json."""
    config = folder.read_config(source_dir)
    config.pop(folder.KV_CONFIG_KEY, None)  # the source's KV-cache calibration: its keys, not this model's
    config["quantization_config"] = quantization_config(cfg, kept, quantized)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in config:
        config["dtype"] = config["torch_dtype"]
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    folder.copy_side_files(source_dir, dst)
    (dst / QTOOL_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` declares quantized weights: ``quantization_config`` in config.json, or a side file of
    an older tool (AutoGPTQ's ``quantize_config.json``, AutoAWQ's ``quant_config.json``)."""
    return ("quantization_config" in folder.read_config(path)
            or any((Path(path) / f).is_file() for f in ("quantize_config.json", "quant_config.json")))


def tensor_index(path: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (reads headers only). qtool's side files
    (:func:`quant.folder.is_side_file`) hold no weights."""
    stored = (Path(path) / folder.SHARD_INDEX).is_file() or any(
        not folder.is_side_file(f) for f in Path(path).glob("*.safetensors"))
    files = [f for f in folder.weight_files(path) if f.suffix == ".safetensors"] if stored else []
    if not files:
        raise QtoolError(f"{path}: holds no *.safetensors files; quantized checkpoints are read from safetensors only")
    return folder.tensor_index(path, files)


def checkpoint_headers(index: dict[str, Path]) -> dict[str, tuple[Path, list[int], str]]:
    """Tensor name -> ``(file, shape, safetensors dtype such as "I32")`` for :func:`tensor_index`'s tensors,
    read from the files' headers."""
    from safetensors import safe_open

    headers = {}
    for f in sorted(set(index.values())):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                headers[k] = (f, sl.get_shape(), sl.get_dtype())
    return headers
