"""Build the CUDA kernels into a shared library with nvcc directly (torch stable C ABI).

``python -m quant.kernels.build [--arch 80 --arch 90] [--jobs N] [--library kernels|kv]`` compiles
``csrc/`` and links both libraries: ``quant/kernels/_qtool_kernels.so`` (W4A16 GEMM/GEMV, where
:mod:`quant.kernels.loader` looks) and ``quant/kv/_qtool_kv_kernels.so`` (the KV-cache ops,
:mod:`quant.kv.kernels`). Only torch's stable C symbols are used,
so this works against the CPU wheel (CI) as well as a CUDA wheel; see
/work/shared/notes/cuda-build.md. ``setup.py`` calls :func:`build` too.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = ("w4a16_gemv.cu", "w4a16_gemm.cu", "w4a16_dequant.cu")
SOURCES = KERNEL_SOURCES + ("binding.cpp",)
LIB_NAME = "_qtool_kernels.so"
KV_SOURCES = ("kv_cache.cu", "kv_binding.cpp")  # the KV-cache library (quant/kv/kernels.py)
KV_LIB_NAME = "_qtool_kv_kernels.so"
# Every library setup.py builds: (package folder under quant/, library name, sources).
LIBRARIES = (("kernels", LIB_NAME, SOURCES), ("kv", KV_LIB_NAME, KV_SOURCES))
DEFAULT_ARCHS = ("80", "90")
# Oldest torch whose stable ABI we target (the GPU machine runs 2.11).
TORCH_TARGET_VERSION = "0x020B000000000000"
CXX_FLAGS = ("-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr")
# ptxas resource report (registers, smem, spills) for every kernel; kept in _build/<source>.log.
PTXAS_FLAGS = ("-Xptxas", "-v,-warn-spills")


def find_nvcc() -> str | None:
    """nvcc on PATH, under $CUDA_HOME, or at /usr/local/cuda; None if absent."""
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and Path(c).is_file()), None)


def gencode_flags(archs) -> list[str]:
    # Real machine code per arch, never -arch=native (no GPU here: it would pick sm_75).
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def build(out_dir: Path | None = None, archs=DEFAULT_ARCHS, jobs: int = 4, nvcc: str | None = None,
          obj_dir: Path | None = None, sources=SOURCES, lib_name: str = LIB_NAME) -> Path:
    """Compile and link the library; returns its path. Raises RuntimeError on a compiler error.

    Objects and the ptxas logs (``<source>.log``) go to ``obj_dir`` (default ``build/qtool_kernels``).
    """
    import torch

    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    torch_dir = Path(torch.__file__).parent
    out_dir = Path(out_dir or Path(__file__).parent)
    obj_dir = Path(obj_dir or ROOT / "build" / "qtool_kernels")
    obj_dir.mkdir(parents=True, exist_ok=True)
    common = [nvcc, *CXX_FLAGS, f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", f"-I{torch_dir / 'include'}", f"-I{CSRC}"]

    def compile_one(src: str) -> Path:
        obj = obj_dir / (src + ".o")
        flags = [*gencode_flags(archs), *PTXAS_FLAGS] if src.endswith(".cu") else []
        (obj_dir / (src + ".log")).write_text(_run([*common, *flags, "-c", str(CSRC / src), "-o", str(obj)]))
        return obj

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        objs = list(pool.map(compile_one, sources))
    lib = out_dir / lib_name
    tmp = out_dir / (lib_name + ".tmp")
    _run([nvcc, "-shared", "-cudart", "static", *gencode_flags(archs), *map(str, objs), "-o", str(tmp),
          f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Xlinker=-rpath,{torch_dir / 'lib'}"])
    tmp.replace(lib)  # atomic: a loader never sees a half-written library
    log.info("built %s for sm_%s", lib, ",sm_".join(archs))
    return lib


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def resource_report(ptxas_log: str) -> list[dict]:
    """Parse ``-Xptxas -v`` output: one dict per (kernel, arch) with registers, smem, stack and spills."""
    rows, cur = [], None
    for line in ptxas_log.splitlines():
        if m := _ENTRY.search(line):
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            rows.append(cur)
        elif cur is not None and (m := _SPILL.search(line)):
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        elif cur is not None and (m := re.search(r"Used (\d+) registers", line)):
            cur["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                cur["smem"] = int(s.group(1))
    return rows


def demangle(name: str) -> str:
    """Short readable kernel name: ``gemm_kernel<__half, 2, 4, true>`` from the mangled symbol."""
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    except OSError:
        return name
    out = out.replace("qtool::(anonymous namespace)::", "").replace("(qtool::W4A16Args)", "")
    return out.replace("void ", "", 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="compute capability without the dot (repeatable); default 80 and 90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--library", choices=[name for name, _, _ in LIBRARIES], action="append",
                    help="build only this library (repeatable); default all")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name, lib_name, sources in LIBRARIES:
            if args.library and name not in args.library:
                continue
            # logs the library's path
            build(ROOT / "quant" / name, tuple(args.arch or DEFAULT_ARCHS), args.jobs, obj_dir=ROOT / "build" / f"qtool_{name}",
                  sources=sources, lib_name=lib_name)
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
