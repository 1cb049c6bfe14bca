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


def load_compiled(path: Path, build_command: str) -> str | None:
    """Load the op library at ``path`` into ``torch.ops``. Returns None on success, else why it was not loaded
    (``build_command`` says how to build a missing one)."""
    if not path.is_file():
        return f"{path} not built ({build_command})"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        return f"{path} failed to load: {e}"
    return None


def cuda_path(what: str, load, path: Path, fallback: str) -> bool:
    """Whether ``what`` runs compiled kernels on CUDA here (``load()`` is None), saying once which path it takes."""
    if not torch.cuda.is_available():
        log.info("%s on CUDA: no CUDA device; using the reference path", what)
        return False
    reason = load()
    if reason is None:
        log.info("%s on CUDA: compiled kernels (%s)", what, path)
        return True
    log.warning("%s on CUDA: %s, because %s", what, fallback, reason)
    return False


@functools.cache
def load_library() -> str | None:
    """Load the compiled W4A16 library once. Returns None on success, else why it was not loaded."""
    return load_compiled(library_path(), "python -m quant.kernels.build")


@functools.cache
def cuda_kernels_available() -> bool:
    """True when the CUDA kernels can run here; says once, at INFO, which path W4A16 matmuls take."""
    return cuda_path("W4A16", load_library, library_path(), "reference path (dequantize + matmul)")


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
