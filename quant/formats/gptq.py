"""GPTQ checkpoint layout (AutoGPTQ / GPTQModel), ``checkpoint_format`` "gptq" (v1) or "gptq_v2".

For a linear ``W[out, in]`` quantized to ``b`` bits (2, 3, 4 or 8):

* ``qweight``: int32 ``[in * b / 32, out]``, packed along the *input* dimension as a
  little-endian bit stream (``quant.formats.bitpack``): input row ``r`` of column
  ``o`` sits at stream bits ``b*r ..`` of column ``o``. For 2/4/8 bits, row
  ``(32/b)*w + i`` is in bits ``b*i ..`` of word ``w``; for 3 bits, 32 rows fill
  three words and rows 10 and 21 straddle word boundaries.
* ``qzeros``: int32 ``[G, out * b / 32]``, packed along the *output* dimension the
  same way. v1 ("gptq") stores ``z - 1`` (the historical off-by-one, masked to
  ``b`` bits); v2 ("gptq_v2") stores ``z``.
* ``scales``: float16 ``[G, out]``.
* ``g_idx``: int32 ``[in]``, the group of each input row; ``i // group_size`` unless
  rows were quantized in act-order (desc_act).
* ``bias``: float16 ``[out]`` when the linear has one.

Dequantization: ``W[o, k] = (q[k, o] - z[g_idx[k], o]) * s[g_idx[k], o]``.

Loaders of v1 add 1 to the stored zero *without* masking (vLLM per field, GPTQModel and
transformers to the whole int32 word, carries included), so a v1 checkpoint cannot hold
``z = 0`` portably: :func:`pack_gptq` refuses it and the quantizer keeps ``z >= 1`` when
it writes v1 (see ``qmath.compute_qparams(min_zero=...)``). Reading, qtool adds to the
word as GPTQModel does (:func:`_v1_to_v2_words`), which reads GPTQModel's own asymmetric
v1 (written by subtracting from the word) exactly.
"""
from __future__ import annotations

import torch

from quant.formats.base import Format, register
from quant.formats.bitpack import pack_bits_i32, unpack_bits_i32, unpack_codes
from quant.formats.packed import PackedWeight

GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def natural_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    g = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // g).to(torch.int32)


def pack_gptq(w: PackedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Tensors of the GPTQ layout from canonical codes (``q[out, in]``, ``zero``/``scale`` ``[out, G]``)."""
    if w.bits not in GPTQ_BITS:
        raise ValueError(f"the GPTQ format holds {GPTQ_BITS}-bit weights, not {w.bits}-bit")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    zero = w.zero.to(torch.int32)
    if checkpoint_format == "gptq":
        if zero.numel() and zero.min() < 1:
            raise ValueError("a v1 GPTQ checkpoint cannot store a zero point of 0 (its loaders add 1 unmasked)")
        zero = zero - 1
    out_f, in_f = w.q.shape
    g_idx = w.g_idx if w.g_idx is not None else natural_g_idx(in_f, w.group_size)
    return {
        "qweight": pack_bits_i32(w.q, w.bits).t().contiguous(),  # [out, in*b/32] -> [in*b/32, out]
        "qzeros": pack_bits_i32(zero.t().contiguous(), w.bits),
        "scales": w.scale.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def unpack_gptq(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, checkpoint_format: str = "gptq"
) -> PackedWeight:
    """Canonical codes from GPTQ tensors (inverse of :func:`pack_gptq`)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    out_f = tensors["scales"].shape[1]
    in_f = tensors["qweight"].shape[0] * 32 // bits
    q = unpack_codes(tensors["qweight"].t().contiguous(), bits)
    qzeros = tensors["qzeros"]
    if checkpoint_format == "gptq" and bits != 3:
        qzeros = _v1_to_v2_words(qzeros, bits)
    zero = unpack_bits_i32(qzeros, bits, out_f).t().contiguous()
    if checkpoint_format == "gptq" and bits == 3:  # fields straddle words: one at a time
        zero = (zero + 1) & (2**bits - 1)
    g_idx = tensors.get("g_idx")
    if g_idx is not None and torch.equal(g_idx.to(torch.int32), natural_g_idx(in_f, group_size).to(g_idx.device)):
        g_idx = None
    scale = tensors["scales"].t().contiguous()
    return PackedWeight(q=q, scale=scale, zero=zero, bits=bits, group_size=group_size, g_idx=g_idx)


def _v1_to_v2_words(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """v1 ``qzeros`` words as v2 (``z``, not ``z - 1``), for 2/4/8 bits: each int32 word plus ``0x11111111`` (the
    pattern of 1 in every field), carries included, as GPTQModel (and transformers through it) reads v1. GPTQModel
    writes asymmetric v1 by subtracting that pattern from the v2 words, so a zero point of 0 borrows from the next
    field; the word addition undoes it exactly, where adding 1 field by field would not. Where no field is all ones
    (every checkpoint qtool writes: its v1 zero points are at least 1) both readings agree."""
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    words = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _fills_words(n: int, bits: int) -> bool:
    # 3-bit values are packed 32 at a time into 3 words; other widths 32/bits per word.
    return (n * bits) % 32 == 0 and (bits != 3 or n % 32 == 0)


class Gptq(Format):
    """The GPTQ layout in one zero-point convention: ``version`` "gptq" (v1, ``z - 1`` stored) or "gptq_v2"."""

    quant_method, bits, holds_act_order = "gptq", GPTQ_BITS, True

    def __init__(self, version: str):
        self.name = self.version = version
        self.title = "GPTQ" if version == "gptq" else "GPTQ v2"

    def layer_error(self, in_features, out_features, bits):
        for what, n in (("in_features", in_features), ("out_features", out_features)):
            if not _fills_words(n, bits):
                return f"{what} {n} cannot be packed into whole int32 words at {bits} bits"
        return None

    def min_zero(self, sym):
        # v1 loaders add 1 to the stored zero point without masking: a zero point of 0 cannot be stored.
        return 1 if self.version == "gptq" and not sym else 0

    def pack(self, pw):
        return pack_gptq(pw, self.version)

    def unpack(self, tensors, bits, group_size):
        return unpack_gptq(tensors, bits, group_size, self.version)

    def buffers(self, in_features, out_features, bits, n_groups):
        return {"qweight": ((in_features * bits // 32, out_features), torch.int32),
                "qzeros": ((n_groups, out_features * bits // 32), torch.int32),
                "scales": ((n_groups, out_features), torch.float16),
                "g_idx": ((in_features,), torch.int32)}

    def quantization_config(self, bits, group_size, sym, act_order, extra=None):
        """``extra``: the solver's settings GPTQ loaders record (``true_sequential``, ``damp_percent``,
        ``static_groups``); absent ones are written as the GPTQ defaults."""
        extra = extra or {}
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
                "true_sequential": extra.get("true_sequential", True), "damp_percent": extra.get("damp_percent", 0.01),
                "static_groups": extra.get("static_groups", False), "checkpoint_format": self.version}


for _version in CHECKPOINT_FORMATS:
    register(Gptq(_version))
