"""qtool's Python API.

    import quant
    quant.quantize("model/", "model-w4/", method="awq", bits=4, group_size=128)
    model = quant.load("model-w4/")             # transformers model with QuantLinear layers
    quant.perplexity(model, tokenizer, text)
"""
from __future__ import annotations

import importlib
import logging

from quant.config import AWQOptions, GPTQOptions, QuantConfig
from quant.errors import QtoolError

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Imported on first use (PEP 562), so that the options, the errors and the command line's refusals of bad options
# need neither torch nor transformers (seconds to import): name -> the module that defines it.
_LAZY = {"kv": "quant.kv", "load": "quant.loading", "QuantReport": "quant.pipeline", "quantize": "quant.pipeline",
         "PerplexityResult": "quant.ppl", "perplexity": "quant.ppl"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'quant' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"quant.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "AWQOptions",
    "GPTQOptions",
    "PerplexityResult",
    "QtoolError",
    "QuantConfig",
    "QuantReport",
    "kv",
    "load",
    "load_any",
    "perplexity",
    "quantize",
]


def load_any(path, dtype="auto", device="auto"):
    """``(model, tokenizer)`` for a full-precision model folder or a quantized checkpoint.

    ``dtype="auto"``: float32 on the CPU (exact reference compute), the checkpoint's dtype on a GPU. Raises
    :class:`QtoolError` (one sentence) for a path that is no model folder, a bad dtype or device, and a damaged
    checkpoint.
    """
    import torch

    from quant import model_io

    dev = model_io.parse_device(device)
    if dtype == "auto":
        dtype = torch.float32 if dev.type == "cpu" else None
    elif isinstance(dtype, str):
        dtype = model_io.torch_dtype(dtype)
    from quant.checkpoint import is_quantized_checkpoint
    from quant.formats.spec import read_spec
    from quant.loading import load

    quantized = is_quantized_checkpoint(path)
    if quantized:
        read_spec(path)  # a malformed quantization_config in qtool's sentence, before transformers reads it
    model_io.check_causal_lm(path)
    tokenizer = model_io.load_tokenizer(path)
    if quantized:
        model = load(path, dtype=dtype, device=dev)
    else:
        model = model_io.load_fp_model(path, dtype=dtype or "auto").to(dev)
    return model, tokenizer
