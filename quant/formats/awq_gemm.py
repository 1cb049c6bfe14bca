"""AutoAWQ "gemm" checkpoint layout (version "gemm"), the one vLLM, transformers and LMDeploy load.

For a linear ``W[out, in]`` quantized to 4 bits in groups of ``g`` input features:

* ``qweight``: int32 ``[in, out / 8]``, packed along the *output* dimension.
  Nibble ``i`` (bits ``4i .. 4i+3``) of word ``c`` in row ``k`` holds the code of
  output column ``8c + AWQ_ORDER[i]``, ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
* ``qzeros``: int32 ``[in / g, out / 8]``, the integer zero points, packed the same way.
* ``scales``: float16 ``[in / g, out]``.
* ``bias``: float16 ``[out]`` when the linear has one.

Dequantization: ``W[o, k] = (q[k, o] - z[k // g, o]) * s[k // g, o]``. Only 4 bits exist,
always with zero points (no symmetric variant), never with act-order.
"""
from __future__ import annotations

import torch

from quant.formats.base import Format, register
from quant.formats.bitpack import pack_bits_i32, unpack_bits_i32, unpack_codes
from quant.formats.packed import PackedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Inverse permutation: output column j within a word sits in nibble AWQ_REVERSE_ORDER[j].
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
BITS = 4


def _interleave(cols: torch.Tensor) -> torch.Tensor:
    # [..., out] -> [..., out] with each run of 8 columns reordered into nibble order.
    lead = cols.shape[:-1]
    x = cols.reshape(*lead, -1, 8)[..., list(AWQ_ORDER)]
    return x.reshape(*lead, -1)


def _deinterleave(nibbles: torch.Tensor) -> torch.Tensor:
    lead = nibbles.shape[:-1]
    x = nibbles.reshape(*lead, -1, 8)[..., list(AWQ_REVERSE_ORDER)]
    return x.reshape(*lead, -1)


def pack_awq_gemm(w: PackedWeight) -> dict[str, torch.Tensor]:
    """Tensors of the AWQ "gemm" layout from canonical codes ``q[out, in]``, ``zero``/``scale`` ``[out, G]``.

    Raises ValueError for weights the layout cannot hold (not 4-bit, act-order, ``out % 8``)."""
    if w.bits != BITS:
        raise ValueError(f"the AWQ gemm format holds 4-bit weights only, not {w.bits}-bit")
    if w.g_idx is not None:
        raise ValueError("the AWQ gemm format cannot hold act-order (g_idx) weights")
    out_f, _ = w.q.shape
    if out_f % 8:
        raise ValueError(f"the AWQ gemm format needs out_features divisible by 8, got {out_f}")
    return {
        "qweight": pack_bits_i32(_interleave(w.q.t().contiguous()), BITS),
        "qzeros": pack_bits_i32(_interleave(w.zero.t().contiguous().to(torch.int32)), BITS),
        "scales": w.scale.t().contiguous().to(torch.float16),
    }


def unpack_awq_gemm(tensors: dict[str, torch.Tensor], group_size: int) -> PackedWeight:
    """Canonical codes from AWQ "gemm" tensors (inverse of :func:`pack_awq_gemm`)."""
    codes = unpack_codes(tensors["qweight"], BITS)  # [in, out] in nibble order
    # Nibble order within each run of 8 outputs, AWQ_REVERSE_ORDER, is [0, 4, 1, 5, 2, 6, 3, 7]: output 8k + 2c + d
    # is nibble 4d + c. One strided copy undoes it and transposes to [out, in].
    in_f, out_f = codes.shape
    q = codes.view(in_f, out_f // 8, 2, 4).permute(1, 3, 2, 0).reshape(out_f, in_f)
    zero = _deinterleave(unpack_bits_i32(tensors["qzeros"], BITS)).t().contiguous()
    scale = tensors["scales"].t().contiguous()
    return PackedWeight(q=q, scale=scale, zero=zero, bits=BITS, group_size=group_size)


class AwqGemm(Format):
    """AutoAWQ's "gemm" layout (``quant_method: awq``, ``version: gemm``)."""

    name, title, quant_method, bits = "awq", "AWQ gemm", "awq", (BITS,)
    holds_sym = False

    def layer_error(self, in_features, out_features, bits):
        if out_features % 8:
            return f"out_features {out_features} is not divisible by 8 (AWQ packs 8 outputs per int32)"
        return None

    def pack(self, pw):
        return pack_awq_gemm(pw)

    def unpack(self, tensors, bits, group_size):
        return unpack_awq_gemm(tensors, group_size)

    def buffers(self, in_features, out_features, bits, n_groups):
        return {"qweight": ((in_features, out_features // 8), torch.int32),
                "qzeros": ((n_groups, out_features // 8), torch.int32),
                "scales": ((n_groups, out_features), torch.float16)}

    def quantization_config(self, bits, group_size, sym, act_order, extra=None):
        return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm"}


register(AwqGemm())
