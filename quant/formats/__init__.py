"""Checkpoint layouts. Each module documents its tensors exactly; all share ``PackedWeight``."""
from quant.formats.awq_gemm import pack_awq_gemm, unpack_awq_gemm
from quant.formats.gptq import pack_gptq, unpack_gptq
from quant.formats.packed import PackedWeight

__all__ = ["PackedWeight", "pack_awq_gemm", "pack_gptq", "unpack_awq_gemm", "unpack_gptq"]
