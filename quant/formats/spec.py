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


def _side_config(path: str | os.PathLike, name: str) -> dict | None:
    """The settings of side file ``name`` in folder ``path`` as a ``quantization_config``, or None where it is not
    there: AutoGPTQ / GPTQModel's ``quantize_config.json`` (GPTQ), older AutoAWQ's ``quant_config.json`` (``w_bit``,
    ``q_group_size``, ``zero_point``, ``version``)."""
    f = Path(path) / name
    if not f.is_file():
        return None
    if name == "quantize_config.json":
        return {"quant_method": "gptq",
                **folder.read_json_object(f, "the quantization settings (bits, group_size, ...)")}
    old = folder.read_json_object(f, "the quantization settings (w_bit, q_group_size, ...)")
    return {"quant_method": "awq", "bits": old.get("w_bit", 4), "group_size": old.get("q_group_size", 128),
            "zero_point": old.get("zero_point", True), "version": old.get("version", "gemm")}


def _raw_config(path: str | os.PathLike, side_files: bool = True) -> dict:
    qc = folder.read_config(path).get("quantization_config")
    if side_files and (legacy := _side_config(path, "quantize_config.json")) is not None:
        qc = {**legacy, **(qc or {})}  # it fills what config.json leaves out (e.g. checkpoint_format)
    if side_files and qc is None:
        qc = _side_config(path, "quant_config.json")
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
    return _spec(_raw_config(path, side_files), path)


def _spec(qc: dict, path) -> CheckpointSpec:
    """:func:`read_spec` of the ``quantization_config`` ``qc`` (read from folder ``path``)."""
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


_SIDE_FILES = ("quantize_config.json", "quant_config.json")  # AutoGPTQ's, older AutoAWQ's


def side_file_problems(path: str | os.PathLike, spec: CheckpointSpec) -> dict[str, str]:
    """Loader -> why it does not read ``spec`` (read with the side files) where an older tool's side file is in the
    folder; empty where there is none, or where every loader reads what qtool reads.

    transformers, vLLM and LMDeploy take the settings from config.json alone (vLLM reads a side file only when the
    method is given on its command line); AutoAWQ 0.2.9 too (``awq/models/_config.py`` reads config.json's
    ``quantization_config``, at the commit :mod:`quant.formats.compat` cites); GPTQModel reads ``quantize_config.json``
    first, then ``quant_config.json``, and config.json only where neither is there (``QUANT_CONFIG_FILENAME_COMPAT``)."""
    sides = [f for f in _SIDE_FILES if (Path(path) / f).is_file()]
    if not sides:
        return {}
    named = " and ".join(sides)
    problems = {}
    if folder.read_config(path).get("quantization_config") is None:
        why = (f"config.json declares no quantization_config: the settings are in {named} only, and a loader that "
               "reads config.json takes the folder for a full-precision model")
        problems = {loader: why for loader in ("transformers", "vllm", "lmdeploy", "autoawq")}
        if sides != ["quantize_config.json"]:  # GPTQModel reads AutoGPTQ's file as qtool does; AutoAWQ's, not known
            problems["gptqmodel"] = f"it reads {sides[0]} first, and that it reads it as qtool does is not established"
        return problems
    try:
        alone = read_spec(path, side_files=False)
    except QtoolError as e:
        alone, why = None, f"config.json's quantization_config alone is not readable ({e}); {named} completes it"
    if alone is not None and _key(alone) != _key(spec):
        why = (f"config.json's quantization_config declares {_declares(alone)}, and {named} adds what makes it "
               f"{_declares(spec)}: transformers and vLLM read config.json alone")
    elif alone is not None:  # config.json says it all: only GPTQModel, which reads a side file first, may differ
        try:
            first = _spec(_side_config(path, sides[0]), path)
        except QtoolError:
            first = None
        if first is not None and _key(first) == _key(spec):
            return {}
        return {"gptqmodel": f"it reads {sides[0]} before config.json, and {sides[0]} "
                             + (f"declares {_declares(first)}" if first else "is not readable on its own")
                             + f" where config.json's quantization_config declares {_declares(spec)}"}
    return {loader: why for loader in ("transformers", "gptqmodel", "vllm", "lmdeploy", "autoawq")}


def _key(spec: CheckpointSpec) -> tuple:
    """What a loader must read alike for the same weights."""
    return spec.format.name, spec.bits, spec.group_size, bool(spec.sym), spec.act_order, spec.skipped


def _declares(spec: CheckpointSpec) -> str:
    return (f"{spec.format.name} {spec.bits}-bit, group size {spec.group_size}"
            + (", symmetric" if spec.sym else "") + (", act-order" if spec.act_order else "")
            + (f", {len(spec.skipped)} layers kept" if spec.skipped else ""))
