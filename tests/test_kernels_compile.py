"""CPU CI for the CUDA kernels: nvcc builds every kernel for sm_80 and sm_90 (no GPU needed).

One build of the shared library (all sources, both archs, ptxas ``-v,-warn-spills``)
serves every check: each kernel instantiation must have no spills, no stack
frame, and stay within its register / static shared-memory budget; the library
must load into torch (CPU wheel, stable C ABI) and register the CUDA kernels of
the ``qtool::`` ops. Skipped when nvcc is absent.

Budgets (per thread / per CTA), and why:
* GEMV (256 threads): <= 128 registers, so two CTAs fit an SM's 64K registers
  (16 warps keeping 16-byte weight loads in flight); static smem <= 48 KB.
* GEMM (128 or 256 threads, one CTA per SM at the largest tile): <= 168 registers,
  leaving headroom under the 255 limit; static smem 0 (tiles use dynamic smem,
  at most 4 stages x 21.2 KB = 85 KB, under the 227 KB of an H100 / 163 KB of an A100).
* dequant (256 threads): <= 64 registers; static smem 20 KB (each warp stages one 32x32 tile,
  2.5 KB with padding), so 8+ CTAs fit an SM and keep its loads and stores in flight.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quant.kernels import build

NVCC = build.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

ARCHS = ("80", "90")
BUDGETS = {"gemv_kernel": {"registers": 128, "smem": 48 * 1024}, "gemm_kernel": {"registers": 168, "smem": 0},
           "dequant_kernel": {"registers": 64, "smem": 20 * 1024}}
# Instantiations per arch: gemv 2 dtypes x 3 batch blocks x zeros on/off x split K or not; gemm 2 x 4 tiles x 2;
# dequant 2 x 2.
EXPECTED = {"gemv_kernel": 24, "gemm_kernel": 16, "dequant_kernel": 4}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("qtool_kernels")
    lib = build.build(out_dir=out, archs=ARCHS, jobs=3, obj_dir=out / "obj")
    rows = []
    for src in build.KERNEL_SOURCES:
        rows += build.resource_report((out / "obj" / (src + ".log")).read_text())
    return lib, rows


def _family(row: dict) -> str:
    return next(f for f in BUDGETS if f in row["kernel"])


def test_every_kernel_is_compiled_for_every_arch(built):
    _, rows = built
    for arch in ARCHS:
        for family, count in EXPECTED.items():
            n = sum(1 for r in rows if r["arch"] == f"sm_{arch}" and family in r["kernel"])
            assert n == count, f"{family} has {n} instantiations for sm_{arch}, expected {count}"


def test_no_spills_and_within_budget(built):
    _, rows = built
    problems = []
    for r in rows:
        budget = BUDGETS[_family(r)]
        name = f"{build.demangle(r['kernel'])} {r['arch']}"
        if r["spill_stores"] or r["spill_loads"] or r["stack"]:
            problems.append(f"{name}: spills {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack']} B")
        if r["registers"] > budget["registers"]:
            problems.append(f"{name}: {r['registers']} registers > budget {budget['registers']}")
        if r["smem"] > budget["smem"]:
            problems.append(f"{name}: {r['smem']} B static smem > budget {budget['smem']}")
    assert not problems, "\n".join(problems)


def test_library_loads_and_registers_cuda_kernels(built):
    lib, _ = built
    # A fresh interpreter: loading registers CUDA kernels process-wide, which must not
    # collide with the in-tree library another test may load.
    code = (
        "import torch, quant.kernels.ops as ops\n"
        f"torch.ops.load_library({str(lib)!r})\n"
        "for name in ops.OP_NAMES + (ops.DEQUANT_OP,):\n"
        "    dump = torch._C._dispatch_dump(f'qtool::{name}')\n"
        "    assert 'CUDA: registered' in dump and 'Meta: registered' in dump, dump\n"
        "x = torch.empty(5, 256, dtype=torch.float16, device='meta')\n"
        "qw = torch.empty(8, 4, 32, 4, dtype=torch.int32, device='meta')\n"
        "s = torch.empty(2, 128, dtype=torch.float16, device='meta')\n"
        "y = torch.ops.qtool.w4a16_gemm(x, qw, s, None, None, 128)\n"
        "assert y.shape == (5, 128) and y.dtype == torch.float16\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
