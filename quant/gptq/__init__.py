"""GPTQ (Frantar et al., 2022, "Accurate post-training quantization for generative transformers").

``solver``: ``gptq_quantize(W, H, cfg)``, the column-by-column solve, a function on tensors.
``block``: ``quantize_block(ctx)``, the pipeline's method: collect Hessians, solve, swap
each linear for its packed layer, sub-layer group by sub-layer group.
"""
from quant.gptq.block import quantize_block
from quant.gptq.solver import GPTQResult, gptq_quantize, hessian_error, inverse_hessian_cholesky

__all__ = ["GPTQResult", "gptq_quantize", "hessian_error", "inverse_hessian_cholesky", "quantize_block"]
