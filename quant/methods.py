"""The quantization methods, each a function that quantizes one decoder block.

A method computes and never packs: it returns each linear's :class:`PackedWeight` and
leaves the linear computing with the dequantized weight (:func:`quant.layers.set_quantized`).
The pipeline packs into the checkpoint's layout once, when the block is written."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from calib.runner import BlockInputs
from quant.arch import Arch
from quant.config import QuantConfig
from quant.formats import PackedWeight


@dataclass
class BlockContext:
    """What a method sees of one block. ``names`` are the linears to quantize, relative to the block; ``modules``
    the block modules that hold quantized linears in any block of the model (``("self_attn", "mlp")``:
    :func:`quant.model_check.modules_of` over the run's plan), which name the whole-model check's one-module candidates
    in every block alike, also in a block where ``--skip`` left one of them unquantized (empty: this block's own)."""

    index: int
    block: nn.Module
    names: list[str]
    cfg: QuantConfig
    arch: Arch
    inputs: BlockInputs | None  # None for methods that need no calibration
    modules: tuple[str, ...] = ()


@dataclass
class BlockResult:
    """``packed``: the quantized weight of each linear (names relative to the block); ``info``: extra
    columns for the summary table; ``artifacts``: search results saved with the checkpoint; ``block``: a
    module that replaces the block (the RTN guard's fallback, its linears already packed), None to keep the
    one quantized in place; ``alternatives``: other quantized versions of this block, by name, each a copy of the
    block with its linears packed (:class:`quant.modules.QuantLinear`, so that it holds no dense weights), which the
    whole-model check weighs against the method's (``"rtn"``, set by the RTN guard; ``"gptq"``, plain GPTQ
    beside AWQ+GPTQ). Each alternative is a whole model: its blocks are chained on the guard windows."""

    packed: dict[str, PackedWeight] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)
    block: nn.Module | None = None
    alternatives: dict[str, nn.Module] = field(default_factory=dict)


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
