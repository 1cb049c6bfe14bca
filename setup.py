"""Build hook: the package itself is pure Python; csrc/ kernels are built when a CUDA toolchain allows it.

The CUDA libraries (quant/kernels/_qtool_kernels.so: W4A16 GEMM/GEMV; quant/kv/_qtool_kv_kernels.so:
KV-cache quantize/dequantize) are built with nvcc through torch's
stable C ABI when nvcc is found and either torch is a CUDA build or QTOOL_BUILD_KERNELS=1
(e.g. to build against a CPU wheel); QTOOL_BUILD_KERNELS=0 skips it. torch must be
importable at build time (``pip install --no-build-isolation .``). A failed or skipped
build leaves a working pure-Python install (the loader then uses the reference path).
Build in place instead: ``python -m quant.kernels.build`` (both libraries).
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _kernel_build_module():
    spec = importlib.util.spec_from_file_location("_qtool_build", Path(__file__).parent / "quant/kernels/build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        wanted = os.environ.get("QTOOL_BUILD_KERNELS")
        if wanted == "0":
            return
        try:
            import torch
        except ImportError:
            self.announce("qtool: torch not importable at build time; skipping the CUDA kernels", level=3)
            return
        kb = _kernel_build_module()
        if kb.find_nvcc() is None or (torch.version.cuda is None and wanted != "1"):
            self.announce("qtool: no nvcc or no CUDA torch; installing without the CUDA kernels", level=3)
            return
        root = Path(__file__).parent
        for pkg, lib, sources in kb.LIBRARIES:
            try:
                kb.build(out_dir=Path(self.build_lib) / "quant" / pkg, jobs=os.cpu_count() or 2,
                         obj_dir=root / "build" / f"obj_{pkg}", sources=sources, lib_name=lib)
            except RuntimeError as e:  # never fail the install: the reference path still works
                self.announce(f"qtool: building {lib} failed, installing without it:\n{e}", level=3)


cmdclass = {"build_py": BuildPyWithKernels}
try:
    from setuptools.command.bdist_wheel import bdist_wheel

    class BdistWheelTagged(bdist_wheel):
        """A wheel that carries the compiled libraries is tagged for this Python and platform."""

        def get_tag(self):
            build_lib = Path(self.get_finalized_command("build_py").build_lib)
            if any(build_lib.glob("quant/**/*.so")):
                self.root_is_pure = False
            return super().get_tag()

    cmdclass["bdist_wheel"] = BdistWheelTagged
except ImportError:  # setuptools < 70.1: the wheel keeps the generic tag
    pass

setup(cmdclass=cmdclass)
