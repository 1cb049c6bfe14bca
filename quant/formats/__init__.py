"""Checkpoint layouts: one :class:`Format` per layout, registered by name ("awq", "gptq", "gptq_v2").

Each layout's module documents its tensors exactly; all share :class:`PackedWeight`.
"""
from quant.formats.base import Format, format_names, get_format
from quant.formats.packed import PackedWeight
from quant.formats.awq_gemm import pack_awq_gemm, unpack_awq_gemm  # noqa: E402  (registers "awq")
from quant.formats.gptq import pack_gptq, unpack_gptq  # noqa: E402  (registers "gptq", "gptq_v2")

__all__ = ["Format", "PackedWeight", "format_names", "get_format", "pack_awq_gemm", "pack_gptq",
           "unpack_awq_gemm", "unpack_gptq"]
