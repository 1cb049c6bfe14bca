"""The quantization methods, each a function that quantizes one decoder block in place."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from calib.runner import BlockInputs
from quant.arch import Arch
from quant.config import QuantConfig


@dataclass
class BlockContext:
    """What a method sees of one block. ``names`` are the linears to quantize, relative to the block."""

    index: int
    block: nn.Module
    names: list[str]
    cfg: QuantConfig
    arch: Arch
    inputs: BlockInputs | None  # None for methods that need no calibration


@dataclass
class BlockResult:
    """``info``: extra columns for the summary table; ``artifacts``: search results saved with the checkpoint;
    ``block``: a module that replaces the block (the RTN guard's fallback), None to keep the one quantized in place;
    ``rtn_block``: the block quantized by round-to-nearest (set by the RTN guard), for the whole-model check."""

    info: dict = field(default_factory=dict)
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)
    block: nn.Module | None = None
    rtn_block: nn.Module | None = None


BlockQuantizer = Callable[[BlockContext], BlockResult]

# method -> "module:function"; imported on first use so methods stay independent of each other.
_REGISTRY = {
    "rtn": "quant.rtn:quantize_block",
    "awq": "quant.awq:quantize_block",
    "gptq": "quant.gptq:quantize_block",
}


def get_method(name: str) -> BlockQuantizer:
    module, func = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), func)
