"""Value ranges of floating-point tensors: finiteness and magnitude read in chunks (no full-size temporary of an
embedding), and a conversion to a narrower dtype refused where a value would turn inf."""
from __future__ import annotations

import torch

from quant.errors import QtoolError

_CHUNK = 2**22  # elements per step of a whole-tensor check: no full-size temporaries for an embedding


def converted(t: torch.Tensor, dtype: torch.dtype, name: str, largest=None, why: str | None = None) -> torch.Tensor:
    """Finite tensor ``t`` (a weight ``name``) as ``dtype`` (floats only; others as they are). Raises QtoolError
    where a value is beyond ``dtype``'s range (float16's 65504, bfloat16's 3.39e38), which would turn inf: the
    sentence starts with ``why`` (what chose ``dtype``, e.g. ``--dtype float16``) where given. ``largest()``
    gives the weight's largest magnitude for the message where ``t`` is a slice of it."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    out = t.to(dtype)
    # only a narrower range can overflow (float32 -> float16 or bfloat16; bfloat16 -> float16): scanned only then
    narrower = torch.finfo(dtype).max < torch.finfo(t.dtype).max
    if narrower and not all_finite(out) and all_finite(t):  # NaN in t: said as such where it is read
        short = str(dtype).removeprefix("torch.")
        raise QtoolError(f"{why + ': ' if why else ''}{name} holds values up to "
                         f"{largest() if largest else abs_max(t):.6g}, beyond {short}'s {torch.finfo(dtype).max:.6g} "
                         "(they would be inf); use --dtype "
                         + ("bfloat16 or float32" if dtype == torch.float16 else "float32"))
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, checked in chunks (``torch.isfinite`` on a whole
    embedding would allocate temporaries several times its size)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _CHUNK]).all()) for i in range(0, flat.numel(), _CHUNK))


def abs_max(t: torch.Tensor) -> float:
    """``max |t|`` computed in chunks, without a full-size temporary."""
    flat = t.reshape(-1)
    return max((float(flat[i:i + _CHUNK].abs().max()) for i in range(0, flat.numel(), _CHUNK)), default=0.0)
