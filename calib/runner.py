"""The sequential runner: one decoder block at a time on the compute device.

The model stays on the CPU. Each block in turn moves to the device (in the compute
dtype), sees the calibration batch, is handed to the quantizer, and its *quantized*
outputs become the next block's inputs. Peak device memory is one block plus the
calibration activations.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from calib.collectors import BlockCall, record_block_calls


def _move(obj, device, dtype=None):
    """Tensors inside nested tuples/lists/dicts moved to ``device`` (floating ones cast to ``dtype``)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj


def _tensors(block: nn.Module):
    return itertools.chain(block.named_parameters(), block.named_buffers())


def _cast_back(block: nn.Module, names: set[str], dtype: torch.dtype) -> None:
    """Back to the stored dtype, only the tensors the block held before it was quantized: new ones
    (packed weights, float16 scales) keep the dtype they were made with."""
    for name, t in _tensors(block):
        if name in names and t.is_floating_point():
            t.data = t.data.to(dtype)


@dataclass
class BlockInputs:
    """The calibration inputs of one block: one :class:`BlockCall` per minibatch, on the device."""

    calls: list[BlockCall]

    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's outputs for every minibatch (hidden states only)."""
        outs = []
        with torch.no_grad():
            for c in self.calls:
                out = block(c.hidden, *c.args, **c.kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    @property
    def n_tokens(self) -> int:
        return sum(c.hidden.shape[0] * c.hidden.shape[1] for c in self.calls)


BlockFn = Callable[[int, nn.Module, BlockInputs], None]


def run_sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    process_block: BlockFn,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    on_block_done: Callable[[int], None] | None = None,
) -> None:
    """Feed ``input_ids [n, seq]`` through ``blocks`` one at a time, calling ``process_block`` on each.

    ``process_block(i, block, inputs)`` may change the block in place (replace its
    linears by quantized ones); the block's outputs are computed *after* it returns.
    """
    per_batch = [record_block_calls(model, blocks, ids) for ids in input_ids.split(batch_size)]
    hidden = [_move(calls[0].hidden, device, compute_dtype) for calls in per_batch]
    for i, block in enumerate(blocks):
        store_dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), compute_dtype)
        held = {n for n, t in _tensors(block) if t.is_floating_point()}
        block.to(device=device, dtype=compute_dtype)
        calls = [
            BlockCall(h, _move(b[i].args, device, compute_dtype), _move(b[i].kwargs, device, compute_dtype))
            for h, b in zip(hidden, per_batch)
        ]
        inputs = BlockInputs(calls)
        process_block(i, block, inputs)
        hidden = inputs.run(block)
        block.to(device="cpu")
        _cast_back(block, held, store_dtype)
        if on_block_done is not None:
            on_block_done(i)
