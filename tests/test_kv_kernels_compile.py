"""CPU CI for the KV-cache CUDA kernels: nvcc builds csrc/kv_cache.cu for sm_80 and sm_90 (no GPU needed).

Checks: every (op, dtype, bits) instantiation is compiled for both archs with no spills and no stack
frame and within a register budget; the library loads into the CPU torch wheel and registers CUDA
kernels for the four ``qtool::kv_*`` ops; the ops' CPU kernels are the reference. Skipped without nvcc.

Budget: <= 64 registers per thread. The kernels are memory-bound streaming passes; 64 registers still
allow 1024 resident threads per SM (half occupancy), enough loads in flight to stream at full
bandwidth. Measured with nvcc 13.0: 16 to 32 registers.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quant.kernels import build as kbuild
from quant.kv import kernels
from quant.kv import quantizer as kq

ARCHS = ("80", "90")
OPS = ("quantize_per_token_kernel", "dequantize_per_token_kernel", "quantize_per_channel_kernel",
       "dequantize_per_channel_kernel")
REGISTER_BUDGET = 64

needs_nvcc = pytest.mark.skipif(kbuild.find_nvcc() is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("qtool_kv_kernels")
    lib = kernels.build(out_dir=out, archs=ARCHS, jobs=2, obj_dir=out / "obj")
    return lib, kbuild.resource_report((out / "obj" / "kv_cache.cu.log").read_text())


@needs_nvcc
def test_every_kernel_is_compiled_for_every_arch(built):
    _, rows = built
    for arch in ARCHS:
        for op in OPS:
            # Mangled names carry the identifier's length: "26quantize_..." is not "28dequantize_...".
            n = sum(1 for r in rows if r["arch"] == f"sm_{arch}" and f"{len(op)}{op}" in r["kernel"])
            assert n == 6, f"{op}: {n} instantiations for sm_{arch}, expected 6 (3 dtypes x 2 bit widths)"


@needs_nvcc
def test_no_spills_no_stack_and_within_the_register_budget(built):
    _, rows = built
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"] or r["registers"] > REGISTER_BUDGET]
    assert rows and not bad, bad


@needs_nvcc
def test_library_loads_and_registers_the_cuda_kernels(built, monkeypatch):
    lib, _ = built
    monkeypatch.setenv("QTOOL_KV_KERNELS_LIB", str(lib))
    kernels.load_library.cache_clear()
    try:
        assert kernels.load_library() is None
    finally:
        kernels.load_library.cache_clear()
    for name in ("kv_quantize_per_token", "kv_dequantize_per_token", "kv_quantize_per_channel",
                 "kv_dequantize_per_channel"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qtool::{name}", "CUDA"), name


@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_ops_are_the_reference(bits):
    x = torch.randn(2, 3, 5, 64, dtype=torch.bfloat16)
    codes, scale, zero = torch.ops.qtool.kv_quantize_per_token(x, bits)
    want = kq.quantize_per_token(x, bits)
    assert all(torch.equal(a, b) for a, b in zip((codes, scale, zero), want))
    out = torch.empty_like(x)
    torch.ops.qtool.kv_dequantize_per_token(codes, scale, zero, bits, out)
    assert torch.equal(out, kq.dequantize_per_token(*want, bits, x.dtype))
    s, z = kq.channel_qparams(x.float().amin(dim=(0, 2)), x.float().amax(dim=(0, 2)), bits)
    c = torch.ops.qtool.kv_quantize_per_channel(x, s, z, bits)
    assert torch.equal(c, kq.quantize_per_channel(x, s, z, bits))
    torch.ops.qtool.kv_dequantize_per_channel(c, s, z, bits, out)
    assert torch.equal(out, kq.dequantize_per_channel(c, s, z, bits, x.dtype))
