"""The ``qtool::kv_*`` ops: schemas, fake kernels and CPU kernels (the reference), plus the CUDA library's
build and loader.

CUDA kernels (``csrc/kv_cache.cu``, bound in ``csrc/kv_binding.cpp``) live in their own library,
``quant/kv/_qtool_kv_kernels.so``, built with the W4A16 build helper (torch stable C ABI, nvcc):
``python -m quant.kernels.build --library kv`` (``$QTOOL_KV_KERNELS_LIB`` overrides the path). The cache itself
calls the dispatch functions at the end of this module: the compiled op for CUDA tensors once the
library is built and loads, else the reference functions of :mod:`quant.kv.quantizer` (the CPU
kernels of the ops are the reference too).

Ops (``x``/``out``: ``[batch, kv_heads, tokens, head_dim]`` contiguous, float32/float16/bfloat16):

* ``kv_quantize_per_token(x, bits) -> (codes, scale, zero)``
* ``kv_dequantize_per_token(codes, scale, zero, bits, out) -> ()`` (writes ``out``)
* ``kv_quantize_per_channel(x, scale, zero, bits) -> codes`` (``scale, zero``: float32 ``[kv_heads, head_dim]``)
* ``kv_dequantize_per_channel(codes, scale, zero, bits, out) -> ()``
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from quant.kernels import build as kbuild
from quant.kernels import loader
from quant.kv import quantizer as kq


LIB_NAME, SOURCES = kbuild.KV_LIB_NAME, kbuild.KV_SOURCES

_lib = torch.library.Library("qtool", "FRAGMENT")
_lib.define("kv_quantize_per_token(Tensor x, int bits) -> (Tensor, Tensor, Tensor)")
_lib.define("kv_dequantize_per_token(Tensor codes, Tensor scale, Tensor zero, int bits, Tensor(a!) out) -> ()")
_lib.define("kv_quantize_per_channel(Tensor x, Tensor scale, Tensor zero, int bits) -> Tensor")
_lib.define("kv_dequantize_per_channel(Tensor codes, Tensor scale, Tensor zero, int bits, Tensor(a!) out) -> ()")


def _codes_shape(x: torch.Tensor, bits: int) -> tuple[int, ...]:
    return (*x.shape[:-1], x.shape[-1] * bits // 8)


def _fake_quantize_per_token(x, bits):
    rows = (*x.shape[:-1], 1)
    return (x.new_empty(_codes_shape(x, bits), dtype=torch.uint8), x.new_empty(rows, dtype=torch.float16),
            x.new_empty(rows, dtype=torch.uint8))


def _fake_quantize_per_channel(x, scale, zero, bits):
    return x.new_empty(_codes_shape(x, bits), dtype=torch.uint8)


def _cpu_quantize_per_token(x, bits):
    return kq.quantize_per_token(x, bits)


def _cpu_dequantize_per_token(codes, scale, zero, bits, out):
    out.copy_(kq.dequantize_per_token(codes, scale, zero, bits, out.dtype))


def _cpu_quantize_per_channel(x, scale, zero, bits):
    return kq.quantize_per_channel(x, scale, zero, bits)


def _cpu_dequantize_per_channel(codes, scale, zero, bits, out):
    out.copy_(kq.dequantize_per_channel(codes, scale, zero, bits, out.dtype))


torch.library.register_fake("qtool::kv_quantize_per_token", _fake_quantize_per_token, lib=_lib)
torch.library.register_fake("qtool::kv_quantize_per_channel", _fake_quantize_per_channel, lib=_lib)
torch.library.register_fake("qtool::kv_dequantize_per_token", lambda *a: None, lib=_lib)
torch.library.register_fake("qtool::kv_dequantize_per_channel", lambda *a: None, lib=_lib)
_lib.impl("kv_quantize_per_token", _cpu_quantize_per_token, "CPU")
_lib.impl("kv_dequantize_per_token", _cpu_dequantize_per_token, "CPU")
_lib.impl("kv_quantize_per_channel", _cpu_quantize_per_channel, "CPU")
_lib.impl("kv_dequantize_per_channel", _cpu_dequantize_per_channel, "CPU")


def library_path() -> Path:
    return Path(os.environ.get("QTOOL_KV_KERNELS_LIB") or Path(__file__).parent / LIB_NAME)


def build(out_dir: Path | None = None, archs=("80", "90"), jobs: int = 2, obj_dir: Path | None = None) -> Path:
    """Compile ``csrc/kv_cache.cu`` and ``csrc/kv_binding.cpp`` into the KV library; returns its path."""
    return kbuild.build(out_dir or Path(__file__).parent, archs, jobs, obj_dir=obj_dir or kbuild.ROOT / "build" / "qtool_kv_kernels",
                        sources=SOURCES, lib_name=LIB_NAME)


@functools.cache
def load_library() -> str | None:
    """Load the compiled KV library once. None on success, else why it was not loaded."""
    return loader.load_compiled(library_path(), "python -m quant.kernels.build --library kv")


@functools.cache
def cuda_kv_kernels_available() -> bool:
    """True when the CUDA KV kernels can run here; says once which path the KV ops take."""
    return loader.cuda_path("KV cache ops", load_library, library_path(), "reference path")


# -- dispatch: the compiled op for CUDA tensors when the library is built, else the reference ----------
def _compiled(t: torch.Tensor) -> bool:
    return t.is_cuda and cuda_kv_kernels_available()


def _out_like(codes: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((*codes.shape[:-1], codes.shape[-1] * 8 // bits), dtype=dtype, device=codes.device)


def quantize_per_token(x: torch.Tensor, bits: int):
    if _compiled(x):
        return torch.ops.qtool.kv_quantize_per_token(x.contiguous(), bits)
    return kq.quantize_per_token(x, bits)


def dequantize_per_token(codes, scale, zero, bits: int, dtype: torch.dtype) -> torch.Tensor:
    if _compiled(codes):
        out = _out_like(codes, bits, dtype)
        torch.ops.qtool.kv_dequantize_per_token(codes.contiguous(), scale.contiguous(), zero.contiguous(), bits, out)
        return out
    return kq.dequantize_per_token(codes, scale, zero, bits, dtype)


def quantize_per_channel(x: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    if _compiled(x):
        return torch.ops.qtool.kv_quantize_per_channel(x.contiguous(), scale, zero, bits)
    return kq.quantize_per_channel(x, scale, zero, bits)


def dequantize_per_channel(codes, scale, zero, bits: int, dtype: torch.dtype) -> torch.Tensor:
    if _compiled(codes):
        out = _out_like(codes, bits, dtype)
        torch.ops.qtool.kv_dequantize_per_channel(codes.contiguous(), scale, zero, bits, out)
        return out
    return kq.dequantize_per_channel(codes, scale, zero, bits, dtype)

