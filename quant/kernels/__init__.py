"""W4A16 compute for QuantLinear: one dispatch point, the compiled CUDA kernels, torch's CPU int4 op, the reference.

* :mod:`quant.kernels.dispatch` — ``linear(x, layer)``, the only entry point layers call;
* :mod:`quant.kernels.reference` — the pure-torch definition every path is tested against;
* :mod:`quant.kernels.layout` — the kernels' tile32 weight layout and its repacking;
* :mod:`quant.kernels.ops` — the ``qtool::`` custom ops (schemas, fake and CPU kernels);
* :mod:`quant.kernels.loader` — loads the compiled library (``csrc/``), the only module that does;
* :mod:`quant.kernels.build` — builds it with nvcc.
"""
