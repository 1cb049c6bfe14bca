"""Reading a checkpoint's ``quantization_config``: the one place it is read.

Sources, merged in this order (later keys win): an older tool's side file
(AutoGPTQ / GPTQModel ``quantize_config.json``; AutoAWQ's ``quant_config.json`` with
``w_bit``, ``q_group_size``) and ``config.json``'s ``quantization_config``. Defaults for
keys a checkpoint leaves out are those of the tools that wrote it: group size 128
(AutoAWQ, AutoGPTQ), AWQ version "gemm", GPTQ ``checkpoint_format`` "gptq" (v1, what
every GPTQ loader assumes), ``desc_act`` false.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from quant import folder
from quant.errors import QtoolError
from quant.formats.base import Format, get_format
from quant.formats.compat import kept_from_dynamic

_KERNEL_LAYOUTS = ("marlin", "bitblas", "ipex", "qqq")  # GPTQ repackings for one kernel, not the GPTQ layout
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class CheckpointSpec:
    """What a quantized checkpoint declares.

    ``sym`` is None where the checkpoint does not say (GPTQ configs may omit it);
    ``skipped`` lists the modules declared as left in full precision.
    """

    format: Format
    bits: int
    group_size: int
    sym: bool | None
    act_order: bool
    skipped: tuple[str, ...]
    config: dict  # the merged quantization_config as read

    def with_format(self, fmt: Format) -> CheckpointSpec:
        return replace(self, format=fmt)


def _raw_config(path: str | os.PathLike, side_files: bool = True) -> dict:
    config = folder.read_config(path)
    qc = config.get("quantization_config")
    legacy = Path(path) / "quantize_config.json"
    if side_files and legacy.is_file():  # AutoGPTQ / GPTQModel: fills what config.json leaves out (checkpoint_format)
        qc = {**folder.read_json_object(legacy, "the quantization settings (bits, group_size, ...)"), **(qc or {})}
        qc.setdefault("quant_method", "gptq")
    awq_legacy = Path(path) / "quant_config.json"
    if side_files and qc is None and awq_legacy.is_file():  # older AutoAWQ: w_bit, q_group_size, zero_point, version
        old = folder.read_json_object(awq_legacy, "the quantization settings (w_bit, q_group_size, ...)")
        qc = {"quant_method": "awq", "bits": old.get("w_bit", 4), "group_size": old.get("q_group_size", 128),
              "zero_point": old.get("zero_point", True), "version": old.get("version", "gemm")}
    if qc is None:
        raise QtoolError(f"{path}: config.json has no quantization_config, so this is not a quantized checkpoint")
    if not isinstance(qc, dict):
        raise QtoolError(f"{path}: config.json's quantization_config is {json.dumps(qc)}, not an object of settings")
    return qc


def _int(qc: dict, keys: tuple[str, ...], default: int, where) -> int:
    """The first of ``keys`` present in ``qc``, as an integer (``default`` where none is)."""
    key = next((k for k in keys if k in qc), None)
    value = qc[key] if key else default
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise QtoolError(f"{where}: quantization_config.{key} is {json.dumps(value)}; it must be an integer")
    return int(value)


def _flag(qc: dict, key: str, where) -> bool | None:
    value = qc.get(key)
    if value is not None and not isinstance(value, bool):
        raise QtoolError(f"{where}: quantization_config.{key} is {json.dumps(value)}; it must be true or false")
    return value


def _names(qc: dict, key: str, where) -> list[str]:
    value = qc.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QtoolError(f"{where}: quantization_config.{key} is {json.dumps(value)}; it must be a list of module names")
    return value


def _gptq_version(qc: dict, where) -> str:
    if qc.get("is_marlin_format"):
        raise QtoolError(f"{where}: this GPTQ checkpoint is repacked for the Marlin kernel (is_marlin_format); "
                         "qtool reads the plain GPTQ layout only")
    version = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if version in _KERNEL_LAYOUTS:
        raise QtoolError(f"{where}: checkpoint_format {version!r} is a kernel-specific repacking; qtool reads "
                         "gptq and gptq_v2 checkpoints")
    if version not in ("gptq", "gptq_v2"):
        raise QtoolError(f"{where}: checkpoint_format {version!r} is unknown; qtool reads gptq and gptq_v2")
    return version


def read_spec(path: str | os.PathLike, side_files: bool = True) -> CheckpointSpec:
    """The declared layout and settings of the quantized checkpoint in folder ``path`` (``side_files`` False:
    from config.json's ``quantization_config`` alone, as transformers and vLLM read them).

    Raises QtoolError (one sentence) for a folder that is not a quantized checkpoint, a
    quant_method other than awq/gptq, an AWQ version other than gemm, a kernel-specific
    GPTQ repacking, or bits the layout cannot hold. For GPTQ, the v1/v2 convention is the
    declared one; :func:`quant.gptq_checkpoints.resolve_convention` checks it against the
    stored zero points.
    """
    qc = _raw_config(path, side_files)
    method = qc.get("quant_method")
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise QtoolError(f"{path}: AWQ version {qc.get('version')!r} is not supported; only the 'gemm' layout is")
        fmt, bits, sym = get_format("awq"), _int(qc, ("bits", "w_bit"), 4, path), False
        group_size = _int(qc, ("group_size", "q_group_size"), DEFAULT_GROUP_SIZE, path)
    elif method == "gptq":
        fmt, bits, sym = get_format(_gptq_version(qc, path)), _int(qc, ("bits",), 4, path), _flag(qc, "sym", path)
        group_size = _int(qc, ("group_size",), DEFAULT_GROUP_SIZE, path)
    else:
        raise QtoolError(f"{path}: quant_method {method!r} is not supported; qtool loads awq (gemm) and gptq checkpoints")
    if group_size < 1 and group_size != -1:
        raise QtoolError(f"{path}: quantization_config's group size is {group_size}; it must be a positive number "
                         "of input features, or -1 (one group per output channel)")
    if method == "awq" and _flag(qc, "zero_point", path) is False:
        raise QtoolError(f"{path}: quantization_config.zero_point is false; qtool reads the AWQ gemm layout with "
                         "zero points (zero_point true), the one AutoAWQ, vLLM and transformers read")
    act_order = bool(_flag(qc, "desc_act", path))
    problem = fmt.settings_error(bits, bool(sym), act_order and method == "gptq")
    if problem:
        raise QtoolError(f"{path}: quantization_config says bits={bits}, but {problem}")
    if qc.get("dynamic") is not None and not isinstance(qc["dynamic"], dict):
        raise QtoolError(f"{path}: quantization_config.dynamic is {json.dumps(qc['dynamic'])}; it must be an object "
                         "of module-name rules")
    kept = _names(qc, "modules_to_not_convert", path) or kept_from_dynamic(qc.get("dynamic"))
    return CheckpointSpec(fmt, bits, group_size, sym, act_order, tuple(kept), qc)


# The loader of each side file's own tool (AutoGPTQ's file is read by its successor GPTQModel; AutoAWQ's by AutoAWQ)
_SIDE_FILE_READERS = {"quantize_config.json": "gptqmodel", "quant_config.json": "autoawq"}


def side_file_problem(path: str | os.PathLike, spec: CheckpointSpec) -> tuple[str, str | None] | None:
    """Where an older tool's side file declares what config.json's ``quantization_config`` does not: (why, the
    one loader established to read the side file where config.json declares nothing, else None). None where the
    side files change nothing that ``spec`` (read with them) holds.

    transformers and vLLM take a checkpoint's settings from config.json alone (vLLM reads a side file only when
    the method is given on its command line); neither reads a folder whose config.json declares nothing as
    quantized."""
    sides = [f for f in _SIDE_FILE_READERS if (Path(path) / f).is_file()]
    if not sides:
        return None
    named = " and ".join(sides)
    if folder.read_config(path).get("quantization_config") is None:
        own = _SIDE_FILE_READERS[sides[0]] if len(sides) == 1 else None
        return (f"config.json declares no quantization_config: the settings are in {named} only, and a loader that "
                "reads config.json takes the folder for a full-precision model", own)
    try:
        alone = read_spec(path, side_files=False)
    except QtoolError as e:
        return f"config.json's quantization_config alone is not readable ({e}); {named} completes it", None
    if (alone.format.name, alone.bits, alone.group_size, bool(alone.sym), alone.act_order, alone.skipped) == (
            spec.format.name, spec.bits, spec.group_size, bool(spec.sym), spec.act_order, spec.skipped):
        return None
    return (f"config.json's quantization_config declares {_declares(alone)}, and {named} adds what makes it "
            f"{_declares(spec)}: transformers and vLLM read config.json alone, and which file another loader takes "
            "is not established", None)


def _declares(spec: CheckpointSpec) -> str:
    return (f"{spec.format.name} {spec.bits}-bit, group size {spec.group_size}"
            + (", symmetric" if spec.sym else "") + (", act-order" if spec.act_order else "")
            + (f", {len(spec.skipped)} layers kept" if spec.skipped else ""))
