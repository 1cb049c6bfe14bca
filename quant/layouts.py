"""Checkpoint layouts of remote-code families, run with transformers' native classes.

InternLM2/2.5 and InternLM3 ship as remote code (``auto_map`` + ``trust_remote_code``)
that breaks on current transformers, yet both are Llama mathematically. A
:class:`Layout` maps such a checkpoint onto the native class without executing any
code from the model folder, and maps the quantized model back, so that the
checkpoint qtool writes keeps the family's own names, fused tensors and
``config.json`` (``model_type``, ``auto_map``): what LMDeploy TurboMind and vLLM's
native InternLM2 class read.

Three things differ from the native Llama and are handled here:

* **config**: the stored ``config.json`` gives the native config's fields
  (:meth:`Layout.native_config`); RoPE settings carry over (theta, dynamic NTK scaling,
  which acts only past ``max_position_embeddings``);
* **names**: regular-expression renames of tensor names, stored <-> native;
* **the fused q, k, v projection** of InternLM2 (``attention.wqkv``): its rows are grouped
  per key/value head, ``[Q(h,0) .. Q(h,g-1), K(h), V(h)]`` for ``h = 0 .. kv_heads - 1``
  with ``g = heads / kv_heads`` query heads per key/value head, each ``head_dim`` rows
  (InternLM's ``convert2llama.py`` splits it this way). Loading splits it into
  ``q_proj``, ``k_proj``, ``v_proj``; writing fuses them again. Quantized tensors are
  fused and split in the canonical form (:class:`~quant.formats.PackedWeight`: codes,
  scales and zero points are per output row, so the interleave is a row permutation
  and changes no rounding), then packed by the checkpoint's format, bit-exactly.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quant.errors import QtoolError
from quant.formats import Format, PackedWeight

_QUANT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Shape:
    """What fused tensors are split by: the attention heads (fused q, k, v rows), the routed experts."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int = 0

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        experts = next((getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                        if getattr(config, k, None)), 0)
        return cls(heads, getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads, experts)


@dataclass(frozen=True)
class Layout:
    """How a family's checkpoints differ from the transformers class qtool runs it with.

    ``native``: that class's ``model_type``; ``config``: stored ``config.json`` -> the native
    config's fields (raises QtoolError for settings the native class cannot reproduce);
    ``renames``: ``(stored, native)`` regular expressions over whole tensor names, applied
    in order (the reverse direction uses ``reverse``); ``fused_qkv``: the stored name of a
    fused q, k, v projection relative to a block (``attention.wqkv``), with ``qkv`` the
    native projections it splits into. Every layout also reads routed experts stored fused, as
    transformers 5 holds them (``experts.gate_up_proj [E, 2I, H]``, gate rows first, and
    ``experts.down_proj [E, H, I]``), as one tensor per expert and projection
    (``experts.{e}.gate_proj.weight``..., :mod:`quant.moe`); they are written per expert.
    """

    name: str
    native: str = ""
    config: Callable[[dict, str], dict] | None = None  # None: transformers reads config.json natively
    renames: tuple[tuple[str, str], ...] = ()
    reverse: tuple[tuple[str, str], ...] = ()
    fused_qkv: str | None = None
    qkv: tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    # Used only where the installed transformers has no class for the model_type (newer ones have InternLM3).
    only_without_native: bool = False

    @property
    def remote_code(self) -> bool:
        """Whether the family ships as remote code (transformers has no class of its own: its config is mapped
        onto :attr:`native`), so that only loaders with a class for it read its checkpoints."""
        return self.config is not None

    # --- config -------------------------------------------------------------------------------------

    def native_config(self, stored: dict, where: str = "config.json"):
        """The transformers config of the native class for the stored ``config.json`` dict."""
        from transformers import AutoConfig

        if self.config is None:
            raise ValueError(f"the {self.name} layout reads config.json natively")
        fields = self.config(stored, where)
        config = AutoConfig.for_model(self.native, **fields)
        config.qtool_checkpoint_layout = self.name  # how messages name tensors: quant.arch.spelling
        return config

    # --- names --------------------------------------------------------------------------------------

    def native_name(self, name: str) -> str:
        for pattern, repl in self.renames:
            name = re.sub(pattern, repl, name)
        return name

    def native_names(self, stored: str, shape: Shape) -> list[str]:
        """The native tensors stored tensor ``stored`` holds (three for a fused q, k, v projection, one
        or two per expert for fused experts)."""
        experts = _FUSED_EXPERTS.search(stored)
        if experts:
            base = self.native_name(stored[:experts.start()] + ".x").removesuffix(".x")
            projs = ("gate_proj", "up_proj") if experts.group(1) == "gate_up_proj" else ("down_proj",)
            return [f"{base}.experts.{e}.{p}.weight" for e in range(shape.n_experts) for p in projs]
        if self.fused_qkv and f".{self.fused_qkv}." in stored:
            prefix, leaf = stored.rsplit(f".{self.fused_qkv}.", 1)
            base = self.native_name(f"{prefix}.x").removesuffix(".x")
            return [f"{base}.{proj}.{leaf}" for proj in self.qkv]
        return [self.native_name(stored)]

    def native_modules(self, stored: str, shape: Shape) -> list[str]:
        """The native modules that stored module name ``stored`` (a whole name or a tail such as
        ``feed_forward.w2`` or ``attention.wqkv``) stands for: three for a fused q, k, v projection."""
        names = self.native_names(f".{stored}.weight", shape)
        return [n.removeprefix(".").removesuffix(".weight") for n in names]

    def stored_name(self, name: str) -> str:
        """The name qtool writes native tensor ``name`` under (the fused one for q, k, v)."""
        for pattern, repl in self.reverse:
            name = re.sub(pattern, repl, name)
        if self.fused_qkv:
            for proj in self.qkv:
                name = name.replace(f".{proj}.", f".{self.fused_qkv}.")
        return name

    # --- tensors ------------------------------------------------------------------------------------

    def to_native(self, tensors: dict[str, torch.Tensor], shape: Shape, fmt: Format | None = None,
                  bits: int = 0, group_size: int = 0) -> dict[str, torch.Tensor]:
        """Stored tensors -> native ones. A fused projection's tensors must all be in ``tensors``
        (quantized ones are unpacked with ``fmt``, split by rows and packed again)."""
        out, fused = {}, {}
        for name, t in tensors.items():
            if _FUSED_EXPERTS.search(name) and t.ndim == 3:
                names = self.native_names(name, shape)
                if t.shape[0] != shape.n_experts:
                    raise QtoolError(f"{name}: holds {t.shape[0]} experts, but config.json says {shape.n_experts}")
                parts = [x for e in t for x in (e.chunk(2) if name.endswith("gate_up_proj") else (e,))]
                out.update({n: x.contiguous() for n, x in zip(names, parts)})
            elif self.fused_qkv and f".{self.fused_qkv}." in name:
                prefix, leaf = name.rsplit(f".{self.fused_qkv}.", 1)
                fused.setdefault(prefix, {})[leaf] = t
            else:
                out[self.native_name(name)] = t
        for prefix, parts in fused.items():
            base = self.native_name(f"{prefix}.x").removesuffix(".x")
            for proj, leaves in zip(self.qkv, _split(parts, shape, fmt, bits, group_size, f"{prefix}.{self.fused_qkv}")):
                out.update({f"{base}.{proj}.{leaf}": t for leaf, t in leaves.items()})
        return out

    def to_stored(self, tensors: dict[str, torch.Tensor], shape: Shape, fmt: Format | None = None,
                  bits: int = 0, group_size: int = 0) -> dict[str, torch.Tensor]:
        """Native tensors -> stored ones (the inverse of :meth:`to_native`); q, k and v of a block
        must all be in ``tensors``."""
        out, parts = {}, {}
        for name, t in tensors.items():
            proj = next((p for p in self.qkv if f".{p}." in name), None) if self.fused_qkv else None
            if proj is None:
                out[self.stored_name(name)] = t
                continue
            prefix, leaf = name.rsplit(f".{proj}.", 1)
            parts.setdefault(prefix, [{}, {}, {}])[self.qkv.index(proj)][leaf] = t
        for prefix, (q, k, v) in parts.items():
            where = f"{prefix}.{self.qkv[0]}"
            if not (q.keys() == k.keys() == v.keys()):
                raise QtoolError(f"{where}: q, k and v are not all quantized alike (or not all present), so they "
                                 f"cannot be fused into {self.fused_qkv}; quantize all three or skip all three")
            stored = self.stored_name(f"{prefix}.{self.qkv[0]}.x").removesuffix(".x")
            out.update({f"{stored}.{leaf}": t for leaf, t in _fuse(q, k, v, shape, fmt, bits, group_size,
                                                                     where).items()})
        return out


_FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


# --- the fused rows ----------------------------------------------------------------------------------


def _row_order(shape: Shape) -> torch.Tensor:
    """Fused row -> row of ``cat(q, k, v)``: the interleave of :class:`Layout`'s docstring."""
    g, d, kv = shape.n_heads // shape.n_kv_heads, shape.head_dim, shape.n_kv_heads
    q = torch.arange(kv * g * d).reshape(kv, g, d)
    k = kv * g * d + torch.arange(kv * d).reshape(kv, 1, d)
    v = kv * g * d + kv * d + torch.arange(kv * d).reshape(kv, 1, d)
    return torch.cat([q, k, v], dim=1).reshape(-1)


def _sizes(shape: Shape) -> list[int]:
    return [shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim]


def _check_heads(shape: Shape, where: str) -> None:
    if shape.n_heads % shape.n_kv_heads:
        raise QtoolError(f"{where}: config.json's num_attention_heads {shape.n_heads} is not a multiple of its "
                         f"num_key_value_heads {shape.n_kv_heads}; the fused q, k, v layout needs whole groups")


def _fuse_rows(ts: list[torch.Tensor], shape: Shape) -> torch.Tensor:
    return torch.cat(ts)[_row_order(shape)]


def _split_rows(t: torch.Tensor, shape: Shape) -> list[torch.Tensor]:
    inverse = torch.argsort(_row_order(shape))
    return list(t[inverse].split(_sizes(shape)))


def _fuse(q: dict, k: dict, v: dict, shape: Shape, fmt, bits, group_size, where) -> dict[str, torch.Tensor]:
    _check_heads(shape, where)
    out = {}
    if "bias" in q:
        out["bias"] = _fuse_rows([q["bias"], k["bias"], v["bias"]], shape)
    if "weight" in q:
        out["weight"] = _fuse_rows([q["weight"], k["weight"], v["weight"]], shape)
    if "qweight" in q:
        pws = [fmt.unpack({n: t for n, t in p.items() if n in _QUANT_LEAVES}, bits, group_size) for p in (q, k, v)]
        g_idx = [pw.g_idx for pw in pws]
        if any((a is None) != (g_idx[0] is None) or (a is not None and not torch.equal(a, g_idx[0])) for a in g_idx):
            raise QtoolError(f"{where}: q, k and v were quantized with different act-order column orders, which "
                             "one fused projection cannot hold; quantize without act-order")
        fused = PackedWeight(_fuse_rows([p.q for p in pws], shape), _fuse_rows([p.scale for p in pws], shape),
                             _fuse_rows([p.zero for p in pws], shape), bits, group_size, g_idx[0])
        out.update(fmt.pack(fused))
    return out


def _split(parts: dict, shape: Shape, fmt, bits, group_size, where) -> list[dict[str, torch.Tensor]]:
    _check_heads(shape, where)
    rows = sum(_sizes(shape))
    out: list[dict] = [{}, {}, {}]
    for leaf in ("weight", "bias"):
        if leaf in parts:
            if parts[leaf].shape[0] != rows:
                raise QtoolError(f"{where}.{leaf}: has {parts[leaf].shape[0]} rows, but config.json's attention "
                                 f"({shape.n_heads} heads, {shape.n_kv_heads} key/value heads of {shape.head_dim}) "
                                 f"needs {rows}")
            for o, t in zip(out, _split_rows(parts[leaf], shape)):
                o[leaf] = t.contiguous()
    if "qweight" in parts:
        if fmt is None:
            raise QtoolError(f"{where}: holds packed weights but config.json declares no quantization")
        pw = fmt.unpack({n: t for n, t in parts.items() if n in _QUANT_LEAVES}, bits, group_size)
        if pw.q.shape[0] != rows:
            raise QtoolError(f"{where}: packs {pw.q.shape[0]} rows, but config.json's attention needs {rows}")
        for o, q, s, z in zip(out, _split_rows(pw.q, shape), _split_rows(pw.scale, shape), _split_rows(pw.zero, shape)):
            o.update(fmt.pack(PackedWeight(q.contiguous(), s.contiguous(), z.contiguous(), bits, group_size, pw.g_idx)))
    return out


# --- the families ------------------------------------------------------------------------------------

# The fields every Llama-shaped config names alike.
_SAME = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
         "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "head_dim")


def _llama_fields(c: dict, where: str, bias: bool) -> dict:
    fields = {k: c[k] for k in _SAME if k in c}
    if c.get("rope_scaling") is not None and not isinstance(c["rope_scaling"], dict):
        raise QtoolError(f"{where}: rope_scaling {c['rope_scaling']!r} is not a mapping like "
                         '{"type": "dynamic", "factor": 2.0}')
    rope = dict(c.get("rope_scaling") or {})
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    factor = rope.get("factor", 1.0)
    if kind != "default" and (not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1):
        raise QtoolError(f"{where}: rope_scaling factor {factor!r} is not a number of at least 1")
    if kind not in ("default", "dynamic", "linear", "llama3", "yarn"):
        raise QtoolError(f"{where}: rope_scaling {c['rope_scaling']} is not one qtool maps onto the Llama class "
                         "(dynamic, linear, llama3 or yarn)")
    # dynamic (NTK): base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2)) past max_pos, as the
    # remote code computes it.
    fields["rope_parameters"] = {"rope_type": kind, "rope_theta": float(c.get("rope_theta", 10000.0)), **rope}
    fields["attention_bias"] = bias
    fields["mlp_bias"] = False  # (pretraining_tp is not carried over: it only split the remote code's matmuls)
    if (dtype := c.get("dtype") or c.get("torch_dtype")) is not None:  # what "auto" loads, as the remote code's
        fields["dtype"] = dtype
    return fields


def _internlm_config(c: dict, where: str) -> dict:
    # InternLM's and InternLM2's ``bias`` puts biases on q, k, v (wqkv) and o (none in the MLP), as Llama's
    # attention_bias does.
    return _llama_fields(c, where, bool(c.get("bias", False)))


def _internlm3_config(c: dict, where: str) -> dict:
    qkv_bias, o_bias = bool(c.get("qkv_bias", False)), bool(c.get("bias", False))
    if qkv_bias != o_bias:
        raise QtoolError(f"{where}: qkv_bias={qkv_bias} with bias={o_bias} has no native transformers class "
                         "(Llama's attention_bias covers q, k, v and o together); the released InternLM3 "
                         "models have neither")
    return _llama_fields(c, where, qkv_bias)


INTERNLM2 = Layout(
    name="InternLM2",
    native="llama",
    config=_internlm_config,
    renames=(
        (r"^model\.tok_embeddings\.", "model.embed_tokens."),
        (r"\.attention_norm\.", ".input_layernorm."),
        (r"\.ffn_norm\.", ".post_attention_layernorm."),
        (r"\.attention\.wo\.", ".self_attn.o_proj."),
        (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
        (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
        (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
        (r"^output\.", "lm_head."),
    ),
    reverse=(
        (r"^model\.embed_tokens\.", "model.tok_embeddings."),
        (r"\.input_layernorm\.", ".attention_norm."),
        (r"\.post_attention_layernorm\.", ".ffn_norm."),
        (r"\.self_attn\.o_proj\.", ".attention.wo."),
        (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
        (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
        (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
        (r"^lm_head\.", "output."),
    ),
    fused_qkv="attention.wqkv",
)

INTERNLM3 = Layout(name="InternLM3", native="llama", config=_internlm3_config, only_without_native=True)

# The first InternLM (internlm-7b, internlm-20b; ``InternLMForCausalLM``): Llama's names with biases on q, k, v, o.
INTERNLM1 = Layout(name="InternLM", native="llama", config=_internlm_config)

# Mixtral's Hub checkpoints name its MoE block and expert projections differently from transformers 5's
# class (``block_sparse_moe``, ``w1``/``w3``/``w2``); vLLM's Mixtral loader reads those names.
MIXTRAL = Layout(
    name="Mixtral",
    renames=(
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
        (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
        (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    ),
    reverse=(
        (r"\.mlp\.", ".block_sparse_moe."),
        (r"\.experts\.(\d+)\.gate_proj\.", r".experts.\1.w1."),
        (r"\.experts\.(\d+)\.up_proj\.", r".experts.\1.w3."),
        (r"\.experts\.(\d+)\.down_proj\.", r".experts.\1.w2."),
    ),
)

# The other MoE families: the Hub's per-expert names are the native ones; only fused experts are converted.
MOE = Layout(name="MoE")
