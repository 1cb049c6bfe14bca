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
from quant.formats import get_format
from quant.formats.bitpack import unpack_bits_i32
from quant.formats.spec import CheckpointSpec

log = logging.getLogger(__name__)


def stored_sym_convention(qzeros: torch.Tensor, bits: int) -> str | None:
    """"gptq" or "gptq_v2" if every stored zero is the symmetric one of that convention, else None."""
    stored = unpack_bits_i32(qzeros, bits)
    mid = 2 ** (bits - 1)
    if bool((stored == mid - 1).all()):
        return "gptq"
    if bool((stored == mid).all()):
        return "gptq_v2"
    return None


def resolve_convention(spec: CheckpointSpec, qzeros: Iterable[tuple[str, torch.Tensor]], where: str) -> CheckpointSpec:
    """``spec`` with the GPTQ convention to read the checkpoint with: the declared one, checked on
    ``(name, qzeros)`` of its layers (see the module docstring)."""
    declared = spec.format.name
    if spec.sym is False:
        return spec
    bits = spec.bits
    seen = {name: stored_sym_convention(z, bits) for name, z in qzeros}
    kinds = set(seen.values())
    if None in kinds and spec.sym is None:
        return spec  # zero points vary: an asymmetric checkpoint
    if None in kinds or len(kinds) != 1:
        odd = next((n for n, k in seen.items() if k is None), None) or sorted(seen)[0]
        mid = 2 ** (bits - 1)
        raise QtoolError(
            f"{where}: quantization_config says sym={spec.sym}, but the stored zero points of {odd} are not all "
            f"{mid - 1} (gptq v1) or all {mid} (gptq_v2), or layers disagree; cannot tell which convention the "
            "checkpoint uses, and reading it with the wrong one would shift every weight by one step")
    (stored,) = kinds
    if stored != declared:
        log.warning("%s: declares checkpoint_format %r but its symmetric zero points are stored as in %r; "
                    "reading it as %r", where, declared, stored, stored)
    return spec.with_format(get_format(stored))


def read_leaf(index: dict, names: Iterable[str], leaf: str) -> Iterable[tuple[str, torch.Tensor]]:
    """``(layer, tensor)`` of each layer in ``names`` that stores ``{layer}.{leaf}`` (``qzeros``, ``g_idx``), in name
    order, read from the safetensors files in ``index`` (tensor name -> file)."""
    from safetensors import safe_open

    for name in sorted(names):
        if f"{name}.{leaf}" in index:
            with safe_open(str(index[f"{name}.{leaf}"]), framework="pt") as f:
                yield name, f.get_tensor(f"{name}.{leaf}")


def read_qzeros(index: dict, names: Iterable[str]) -> Iterable[tuple[str, torch.Tensor]]:
    """``(layer, qzeros)`` of each quantized layer, read from the safetensors files in ``index``."""
    return read_leaf(index, names, "qzeros")
