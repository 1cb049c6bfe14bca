"""Compute paths for QuantLinear: compiled CUDA kernels, torch's CPU int4 op, and the pure-torch reference."""
