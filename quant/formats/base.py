"""The ``Format`` interface: one object per checkpoint layout, registered by name.

A quantization method produces :class:`~quant.formats.packed.PackedWeight` (integer
codes ``q[out, in]``, ``scale``/``zero`` ``[out, groups]``, optional ``g_idx``), one
rounding convention for every layout. A ``Format`` owns everything about storing it:

* what it can hold (:meth:`Format.settings_error`, :meth:`Format.layer_error`: one
  sentence naming what does not fit);
* the lowest zero point it can store (:meth:`Format.min_zero`), which the methods
  respect when they round;
* ``pack`` / ``unpack`` (bit-exact inverses) and the buffers a
  :class:`~quant.modules.QuantLinear` holds (:meth:`Format.buffers`);
* writing its ``quantization_config`` (:meth:`Format.quantization_config`); reading one
  back is :func:`quant.formats.spec.read_spec`, the only reader.
"""
from __future__ import annotations

import torch

from quant.formats.packed import PackedWeight


class Format:
    """A checkpoint layout. Subclasses set the class attributes and implement pack/unpack/buffers."""

    name: str  # registry key, also the value of --format
    title: str  # how messages name it
    quant_method: str  # quantization_config["quant_method"]
    bits: tuple[int, ...]  # code widths it can store
    holds_sym: bool = True  # symmetric groups (zero point 2**(bits-1))
    holds_act_order: bool = False  # a g_idx (input rows in act-order)

    def settings_error(self, bits: int, sym: bool, act_order: bool) -> str | None:
        """Why weights with these settings cannot be stored in this layout, or None."""
        if bits not in self.bits:
            return f"the {self.title} layout holds {', '.join(map(str, self.bits))}-bit weights, not {bits}-bit"
        if sym and not self.holds_sym:
            return f"the {self.title} layout always stores zero points: it holds no symmetric weights"
        if act_order and not self.holds_act_order:
            return f"the {self.title} layout has no g_idx, so it cannot hold act-order weights"
        return None

    def layer_error(self, in_features: int, out_features: int, bits: int) -> str | None:
        """Why a linear of this shape cannot be packed in this layout, or None (group divisibility is
        checked by the caller, which knows the group size)."""
        return None

    def min_zero(self, sym: bool) -> int:
        """The smallest integer zero point the layout's loaders read correctly."""
        return 0

    def pack(self, pw: PackedWeight) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> PackedWeight:
        raise NotImplementedError

    def buffers(self, in_features: int, out_features: int, bits: int, n_groups: int
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of each tensor a packed linear holds (bias excluded)."""
        raise NotImplementedError

    def quantization_config(self, bits: int, group_size: int, sym: bool, act_order: bool,
                            extra: dict | None = None) -> dict:
        """The ``quantization_config`` block of config.json for a checkpoint in this layout, without the keys that
        name layers kept in full precision (:func:`quant.formats.compat.exclusion_keys` adds those)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Format {self.name}>"


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered layout called ``name`` ("awq", "gptq", "gptq_v2"); KeyError if none."""
    return _REGISTRY[name]


def format_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)
