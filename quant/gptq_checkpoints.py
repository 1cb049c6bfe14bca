"""Which zero-point convention a GPTQ checkpoint uses: v1 ("gptq", zeros stored ``z - 1``) or "gptq_v2".

Reading one as the other shifts every weight by one quantization step, and the
model still runs: the failure is silent. So the declaration is checked against
the tensors where the tensors can tell:

* the declaration is ``checkpoint_format`` in ``quantization_config`` (config.json,
  or an older tool's ``quantize_config.json``), or GPTQModel's older ``format``
  key; absent, every loader (vLLM, transformers, AutoGPTQ) assumes v1;
* symmetric checkpoints are decidable: every zero point is ``2**(bits-1)``, so the
  stored value is ``2**(bits-1) - 1`` in v1 and ``2**(bits-1)`` in v2. The stored
  value wins over a contradicting declaration (with a warning); a symmetric
  checkpoint whose stored zeros are neither is refused;
* asymmetric checkpoints are not decidable from the tensors (both conventions give
  plausible zero points), so the declaration is used as it is.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from quant.errors import QtoolError
from quant.formats.bitpack import unpack_bits_i32
from quant.formats.gptq import CHECKPOINT_FORMATS

log = logging.getLogger(__name__)
_UNSUPPORTED_LAYOUTS = ("marlin", "bitblas", "ipex", "qqq")


def declared_convention(qc: dict, where: str) -> str:
    """The convention ``quantization_config`` declares ("gptq" when it says nothing)."""
    if qc.get("is_marlin_format"):
        raise QtoolError(f"{where}: this GPTQ checkpoint is repacked for the Marlin kernel (is_marlin_format); "
                         "qtool reads the plain GPTQ layout only")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt in _UNSUPPORTED_LAYOUTS:
        raise QtoolError(f"{where}: checkpoint_format {fmt!r} is a kernel-specific repacking; qtool reads "
                         f"{' and '.join(CHECKPOINT_FORMATS)} checkpoints")
    if fmt not in CHECKPOINT_FORMATS:
        raise QtoolError(f"{where}: checkpoint_format {fmt!r} is unknown; qtool reads {' and '.join(CHECKPOINT_FORMATS)}")
    return fmt


def stored_sym_convention(qzeros: torch.Tensor, bits: int) -> str | None:
    """"gptq" or "gptq_v2" if every stored zero is the symmetric one of that convention, else None."""
    stored = unpack_bits_i32(qzeros, bits)
    mid = 2 ** (bits - 1)
    if bool((stored == mid - 1).all()):
        return "gptq"
    if bool((stored == mid).all()):
        return "gptq_v2"
    return None


def resolve_convention(qc: dict, qzeros: Iterable[tuple[str, torch.Tensor]], where: str) -> str:
    """The convention to read the checkpoint with: the declared one, checked on ``(name, qzeros)`` of its layers."""
    declared = declared_convention(qc, where)
    sym = qc.get("sym")  # AutoGPTQ's default is True, but an absent key proves nothing: look at the zeros
    if sym is False:
        return declared
    bits = int(qc["bits"])
    seen = {name: stored_sym_convention(z, bits) for name, z in qzeros}
    kinds = set(seen.values())
    if None in kinds and sym is None:
        return declared  # zero points vary: an asymmetric checkpoint
    if None in kinds or len(kinds) != 1:
        odd = next((n for n, k in seen.items() if k is None), None) or sorted(seen)[0]
        mid = 2 ** (bits - 1)
        raise QtoolError(
            f"{where}: quantization_config says sym={sym}, but the stored zero points of {odd} are not all "
            f"{mid - 1} (gptq v1) or all {mid} (gptq_v2), or layers disagree; cannot tell which convention the "
            "checkpoint uses, and reading it with the wrong one would shift every weight by one step")
    (stored,) = kinds
    if stored != declared:
        log.warning("%s: declares checkpoint_format %r but its symmetric zero points are stored as in %r; "
                    "reading it as %r", where, declared, stored, stored)
    return stored


def read_qzeros(index: dict, names: Iterable[str]) -> Iterable[tuple[str, torch.Tensor]]:
    """``(layer, qzeros)`` of each quantized layer, read from the safetensors files in ``index``."""
    from safetensors import safe_open

    for name in sorted(names):
        with safe_open(str(index[f"{name}.qzeros"]), framework="pt") as f:
            yield name, f.get_tensor(f"{name}.qzeros")
