"""Writing and reading quantized checkpoints (AWQ "gemm" or GPTQ layout, safetensors + config.json)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from quant import model_io
from quant.config import QuantConfig
from quant.errors import QtoolError
from quant.modules import QuantLinear

log = logging.getLogger(__name__)

QTOOL_META = "qtool.json"  # how the checkpoint was made: method, calibration, sizes (ours only)


def quantization_config(cfg: QuantConfig, skipped: list[str]) -> dict:
    """The ``quantization_config`` block of config.json that vLLM, transformers and LMDeploy read."""
    act_order = cfg.method == "gptq" and cfg.gptq.act_order
    solver = {"true_sequential": cfg.gptq.true_sequential, "damp_percent": cfg.gptq.damp,
              "static_groups": cfg.gptq.static_groups}
    return cfg.format.quantization_config(cfg.bits, cfg.group_size, cfg.sym, act_order, skipped, solver)


FP16_MAX = 65504.0


def _largest_unquantized(model: nn.Module) -> tuple[str, float]:
    """(name, max |x|) of the floating tensor outside the quantized linears with the largest magnitude."""
    quant_prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, QuantLinear))
    best = ("", 0.0)
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not name.startswith(quant_prefixes) and t.numel():
            m = float(t.detach().abs().max())
            if not m <= best[1]:
                best = (name, m)
    return best


def _output_dtype(cfg: QuantConfig, model: nn.Module) -> torch.dtype:
    """The dtype of the checkpoint's unquantized tensors. ``auto``: a half-precision source keeps its dtype; a
    float32 one becomes float16 (AWQ/GPTQ convention) unless float16 cannot hold it: bfloat16 for tensors
    beyond float16's range and for Gemma-family models (their activations exceed it in float16)."""
    name, big = _largest_unquantized(model)
    if cfg.dtype != "auto":
        dtype = model_io.torch_dtype(cfg.dtype)
        if dtype == torch.float16 and big > FP16_MAX:
            raise QtoolError(f"--dtype float16: {name} holds values up to {big:.3g}, beyond float16's {FP16_MAX:.0f}; "
                             "use --dtype bfloat16 or float32")
        return dtype
    src = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if src in (torch.float16, torch.bfloat16):
        return src
    model_type = getattr(model.config, "model_type", "")
    if big > FP16_MAX or model_type.startswith("gemma"):
        why = f"{name} holds values up to {big:.3g}" if big > FP16_MAX else f"{model_type} activations overflow it"
        log.warning("writing the checkpoint in bfloat16, not float16: %s (pass --dtype to choose)", why)
        return torch.bfloat16
    return torch.float16


def checkpoint_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict as it is written: tied parameters once, scales float16, other floats in ``dtype``.

    Only parameters that are the same object under two names (``lm_head`` tied to ``embed_tokens``)
    are written once; transformers re-ties them on load. Buffers are always written, even when they
    share storage (a GPTQ ``g_idx`` may be one tensor held by several layers).
    """
    out, storages = {}, set()
    quant_prefixes = {n + "." for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()}
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        prefix, _, leaf = name.rpartition(".")
        if leaf == "scales" and prefix + "." in quant_prefixes:
            t = t.to(torch.float16)
        elif t.is_floating_point():
            t = t.to(dtype)
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def write_checkpoint(model: nn.Module, cfg: QuantConfig, source_dir: str | os.PathLike, dst: Path,
                     skipped: list[str], meta: dict) -> None:
    """Everything a loader needs, into ``dst`` (a temporary folder the caller renames)."""
    dtype = _output_dtype(cfg, model)
    model_io.save_tensors(checkpoint_tensors(model, dtype), dst)
    config = model_io.read_config(source_dir)
    config["quantization_config"] = quantization_config(cfg, skipped)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in config:
        config["dtype"] = config["torch_dtype"]
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model_io.copy_side_files(source_dir, dst)
    (dst / QTOOL_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` declares quantized weights: ``quantization_config`` in config.json, or a side file of
    an older tool (AutoGPTQ's ``quantize_config.json``, AutoAWQ's ``quant_config.json``)."""
    return ("quantization_config" in model_io.read_config(path)
            or any((Path(path) / f).is_file() for f in ("quantize_config.json", "quant_config.json")))


def tensor_index(path: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (reads headers only). qtool's side files (``qtool_*``:
    the search results of checkpoints made before they moved to ``qtool/``) hold no weights."""
    files = sorted(f for f in Path(path).glob("*.safetensors") if not f.name.startswith("qtool_"))
    if not files:
        raise QtoolError(f"{path}: holds no *.safetensors files; quantized checkpoints are read from safetensors only")
    index = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            index.update({k: f for k in st.keys()})
    return index
