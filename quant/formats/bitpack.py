"""Little-endian bit streams of unsigned integers in int32 words.

``pack_bits_i32(values, bits)`` lays the last dimension out as one bit stream:
value ``j`` occupies stream bits ``bits*j .. bits*j + bits - 1`` and stream bit
``t`` is bit ``t % 32`` of word ``t // 32``. For 2, 4 and 8 bits this is the
plain "value i in bits i*b" packing; for 3 bits it is GPTQ's packing where 32
values fill three words and values 10 and 21 straddle a word boundary.
"""
from __future__ import annotations

import sys

import torch

_CHUNK_ROWS_UNPACK = 4096
_CHUNK_ELEMENTS = 2**20  # values per step: bounds the temporaries (a bit plane is 8 bytes per value and bit)


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    lead, n = values.shape
    v = values.to(torch.int64)
    if 32 % bits == 0:  # whole values per word: shift each into place and add (no bit planes)
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, device=v.device)
        words = (v.reshape(lead, n // per, per) << shifts).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    shifts = torch.arange(bits, device=v.device)
    bitplane = (v[..., None] >> shifts) & 1  # [lead, n, bits]
    stream = bitplane.reshape(lead, n * bits // 32, 32)
    words = (stream << torch.arange(32, device=v.device)).sum(-1)
    # Words above 2**31 wrap to negative int32, which is what the loaders expect.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_bits_i32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values[..., n]`` (each in ``[0, 2**bits)``) into int32 ``[..., n*bits/32]``."""
    n = values.shape[-1]
    if (n * bits) % 32 or (bits == 3 and n % 32):
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole int32 words")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values outside [0, {2**bits}) cannot be packed in {bits} bits")
    flat = values.reshape(-1, n)
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    parts = [_pack_rows(flat[i : i + rows], bits) for i in range(0, flat.shape[0], rows)]
    out = torch.cat(parts) if parts else flat.new_zeros((0, n * bits // 32), dtype=torch.int32)
    return out.reshape(*values.shape[:-1], n * bits // 32)


def unpack_bits_i32(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits_i32`: int32 ``[..., w]`` -> int32 values ``[..., w*32/bits]``."""
    w = words.shape[-1]
    total = w * 32 // bits
    n = total if n is None else n
    if 32 % bits == 0:  # whole values per word: shift and mask (arithmetic shifts are fine under the mask)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        vals = (words.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)  # [..., w, 32/bits]
        return vals.reshape(*words.shape[:-1], total)[..., :n].contiguous()
    flat = words.reshape(-1, w).to(torch.int64) & 0xFFFFFFFF
    out = []
    for i in range(0, flat.shape[0], _CHUNK_ROWS_UNPACK):
        chunk = flat[i : i + _CHUNK_ROWS_UNPACK]
        stream = (chunk[..., None] >> torch.arange(32, device=chunk.device)) & 1  # [r, w, 32]
        bitplane = stream.reshape(chunk.shape[0], total, bits)
        vals = (bitplane << torch.arange(bits, device=chunk.device)).sum(-1)
        out.append(vals[:, :n].to(torch.int32))
    vals = torch.cat(out) if out else flat.new_zeros((0, n), dtype=torch.int32)
    return vals.reshape(*words.shape[:-1], n)


def unpack_codes(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """:func:`unpack_bits_i32` as uint8 codes (:class:`quant.formats.packed.PackedWeight`'s dtype, which then needs
    no range check: ``bits`` bits hold nothing outside ``[0, 2**bits)``). For 2, 4 and 8 bits the codes are read
    from the words' bytes (little-endian: byte ``k`` is bits ``8k..8k+7``), a quarter of the int32 path's memory
    traffic; the values are the same."""
    if 8 % bits or sys.byteorder != "little":
        return unpack_bits_i32(words, bits, n).to(torch.uint8)
    w = words.shape[-1]
    total = w * 32 // bits
    n = total if n is None else n
    b = words.to(torch.int32).contiguous().view(torch.uint8)  # [..., 4w]
    if bits < 8:  # value 8/bits * k + j: bits j*bits.. of byte k
        b = torch.stack([(b >> s) & (2**bits - 1) for s in range(0, 8, bits)], dim=-1).reshape(*words.shape[:-1], total)
    return b[..., :n].contiguous()
