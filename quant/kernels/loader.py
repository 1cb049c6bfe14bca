"""The one loader of the compiled kernels: compiled op if present, else the reference path.

Only this module loads ``_qtool_kernels.so``; algorithm modules never import it.
The library path can be overridden with ``$QTOOL_KERNELS_LIB``.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from quant.kernels import build, ops  # noqa: F401  (ops: the op schemas must exist before the library loads)

log = logging.getLogger(__name__)


def library_path() -> Path:
    return Path(os.environ.get("QTOOL_KERNELS_LIB") or Path(__file__).parent / build.LIB_NAME)


@functools.cache
def load_library() -> str | None:
    """Load the compiled library once. Returns None on success, else why it was not loaded."""
    path = library_path()
    if not path.is_file():
        return f"{path} not built (python -m quant.kernels.build)"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        return f"{path} failed to load: {e}"
    return None


@functools.cache
def cuda_kernels_available() -> bool:
    """True when the CUDA kernels can run here; says once, at INFO, which path W4A16 matmuls take."""
    if not torch.cuda.is_available():
        log.info("W4A16 on CUDA: no CUDA device; using the reference path")
        return False
    reason = load_library()
    if reason is None:
        log.info("W4A16 on CUDA: compiled qtool kernels (%s)", library_path())
        return True
    log.warning("W4A16 on CUDA: reference path (dequantize + matmul), because %s", reason)
    return False


@functools.cache
def has_cuda_kernel(op_name: str) -> bool:
    """Whether the loaded library registers a CUDA kernel for ``qtool::<op_name>`` (a library built before the
    op existed loads fine but lacks it)."""
    if not cuda_kernels_available():
        return False
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"qtool::{op_name}", "CUDA")
    if not has:
        log.warning("W4A16 on CUDA: %s has no CUDA kernel for qtool::%s (built before it existed; rebuild with "
                    "python -m quant.kernels.build); the fused kernels take its shapes", library_path(), op_name)
    return has
