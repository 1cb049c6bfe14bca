"""``QuantLinear``: a linear layer whose weight is held in a checkpoint's packed layout.

The buffers are exactly the checkpoint's tensors (so ``state_dict()`` *is* the
checkpoint); compute goes through one dispatch point, ``quant.kernels.dispatch.linear``,
which picks the compiled CUDA kernel, torch's CPU int4 op or the pure-torch reference.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from quant import qmath
from quant.formats import Format, PackedWeight, get_format


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` with ``W`` packed in a checkpoint layout.

    ``fmt`` is a :class:`quant.formats.Format` or its name ("awq", "gptq", "gptq_v2");
    the layer's buffers are the layout's tensors (:meth:`Format.buffers`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        fmt: Format | str = "awq",
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.format = get_format(fmt) if isinstance(fmt, str) else fmt
        ng = qmath.n_groups(in_features, group_size)
        for name, (shape, dtype) in self.format.buffers(in_features, out_features, bits, ng).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        # Kernel-specific repacked copies, built once on first use; never part of the state_dict.
        self.kernel_cache: dict = {}
        self.dense_cache: dict | None = None  # inside dense_weights(): dtype -> dequantized weight
        self.dense_hold = True  # inside dense_weights(hold=False): dequantized on every call, never kept

    @property
    def fmt(self) -> str:
        return self.format.name

    @classmethod
    def from_packed(cls, pw: PackedWeight, bias: torch.Tensor | None, fmt: Format | str = "awq"):
        """A layer holding ``pw`` packed in ``fmt`` (ValueError where the layout cannot hold it)."""
        fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        out_f, in_f = pw.q.shape
        tensors = fmt.pack(pw)
        layer = cls(in_f, out_f, pw.bits, pw.group_size, fmt, bias is not None,
                    bias.dtype if bias is not None else torch.float16, device="meta")
        for name, t in tensors.items():
            setattr(layer, name, t)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def packed_weight(self) -> PackedWeight:
        """The canonical codes and parameters (unpacked from the buffers)."""
        if self.compacted:
            return self._packed_from_kernel_copy()
        names = self.format.buffers(self.in_features, self.out_features, self.bits, 1)
        return self.format.unpack({n: getattr(self, n) for n in names}, self.bits, self.group_size)

    # --- holding only the kernels' copy of the codes ------------------------------------------------

    @property
    def compacted(self) -> bool:
        """True once :meth:`compact` dropped ``qweight`` for the kernels' copy."""
        return self.qweight.is_meta and self._kernel_entry() is not None

    def compact(self, dtype: torch.dtype = torch.float16) -> bool:
        """Free ``qweight`` (most of the layer's memory) and keep the CUDA kernels' copy of the codes instead.

        Without this a layer on the GPU holds its codes twice: the checkpoint's layout (the
        state_dict) and the kernels' tile32 layout. After it, ``state_dict()`` rebuilds
        ``qweight`` from the kernel copy, bit-exact; ``scales``, ``qzeros`` and ``g_idx`` (a
        few percent of the layer) stay as they are. ``dtype`` is the activation dtype the
        copy is built for. Returns False, changing nothing, where the kernels cannot take the
        layer (not 4-bit, act-order, shape) or it is already compacted.
        """
        from quant.kernels import dispatch, layout

        if self.compacted or layout.layout_check(self.out_features, self.in_features, self.bits,
                                                 self.group_size, dispatch._has_g_idx(self)):
            return False
        dispatch.prepare_cuda(self, dtype, self.qweight.device)
        self.qweight = torch.empty_like(self.qweight, device="meta")
        return True

    def _kernel_entry(self):
        """``(tile32 weight, bias)`` of the kernel-layout copy, or None (keys ``("tile32", ...)``; see
        dispatch.prepare_cuda)."""
        return next((v for k, v in self.kernel_cache.items() if isinstance(k, tuple) and k[0] == "tile32"), None)

    def _kernel_copy(self):
        return self._kernel_entry()[0]

    def _packed_from_kernel_copy(self) -> PackedWeight:
        from quant.kernels import layout

        kw = self._kernel_copy()
        pw = layout.unpack(kw)  # codes and zeros exact; its scales are in the activation dtype
        pw.scale = self.scales.t().contiguous().to(pw.q.device)  # the checkpoint's float16 scales
        pw.group_size = self.group_size
        return pw

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.compacted:
            pw = self._packed_from_kernel_copy()
            tensors = self.format.pack(pw)
            destination[prefix + "qweight"] = tensors["qweight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_cache is not None:
            weight = self.dense_cache.get(x.dtype)
            if weight is None:
                weight = self.packed_weight().dequantize(x.dtype).to(x.device)
                if self.dense_hold:
                    self.dense_cache[x.dtype] = weight
            bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
            return F.linear(x, weight, bias)
        from quant.kernels import dispatch  # the one place compute is chosen

        return dispatch.linear(x, self)

    def _apply(self, fn, recurse=True):
        if self.compacted:  # the kernel copy is the only copy of the codes: it moves with the module
            from quant.kernels import layout

            qweight = self._buffers.pop("qweight")
            try:
                super()._apply(fn, recurse)
            finally:
                self._buffers["qweight"] = qweight
            kw, bias = self._kernel_entry()
            zeros = None if kw.zeros is None else fn(kw.zeros)
            kw = layout.Tile32Weight(fn(kw.qweight), fn(kw.scales), zeros, kw.group_size,
                                     kw.out_features, kw.in_features)
            bias = None if bias is None else fn(bias)
            self.kernel_cache = {("tile32", kw.scales.dtype, str(kw.scales.device)): (kw, bias)}
            if self.out_features % 32 == 0:  # the split-K GEMV's counters, made before any graph capture
                from quant.kernels import dispatch

                dispatch.splitk_counters(self, kw.scales.device)
            return self
        # Moving or casting the module invalidates kernel-layout copies.
        self.kernel_cache = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, format={self.fmt}, bias={self.bias is not None}")


@contextlib.contextmanager
def dense_weights(module: nn.Module, hold: bool = True):
    """Inside the body every :class:`QuantLinear` of ``module`` computes ``F.linear`` with its dequantized
    weight: the reference path's numbers. ``hold``: each weight is dequantized once (per input dtype) and
    kept while the body runs (memory: the module's weights, dense), so that the codes are not unpacked on
    every call; ``hold=False``: dequantized on every call and dropped (memory: one layer's dense weight),
    for a few calls through a large block. For running calibration windows through a quantized block.
    Nested uses share the outer one's copies."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear) and m.dense_cache is None]
    for m in layers:
        m.dense_cache, m.dense_hold = {}, hold
    try:
        yield
    finally:
        for m in layers:
            m.dense_cache, m.dense_hold = None, True


def dense_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes that :func:`dense_weights` holds while ``module`` runs in ``dtype``: every QuantLinear's
    ``[out_features, in_features]`` weight, dequantized."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(m.in_features * m.out_features * size for m in module.modules() if isinstance(m, QuantLinear))
