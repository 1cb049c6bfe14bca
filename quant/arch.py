"""Architecture knowledge, as data: one row per Hugging Face ``model_type``.

Module names are relative to one decoder block. A *scaling group* says which
module produces the input of which linears, so that AWQ can fold a per-channel
scale into the producer (``prev``) and its inverse into the consumers
(``linears``). ``prev`` is a norm or a linear; ``kind`` tells how to fold into it.
``judge`` names the module whose output AWQ judges a scale by when the linears'
own outputs do not tell (attention through its softmax, the MLP through its
activation); without one the linears' outputs are the judge.
"""
from __future__ import annotations

import json

from dataclasses import dataclass, replace

from quant.errors import QtoolError
from quant.layouts import INTERNLM1, INTERNLM2, INTERNLM3, MIXTRAL, MOE, Layout


@dataclass(frozen=True)
class ScaleGroup:
    """``prev`` feeds every module in ``linears`` (their inputs are ``prev``'s output)."""

    prev: str
    linears: tuple[str, ...]
    # "norm": an RMSNorm/LayerNorm weight (and bias); "linear": a linear's output rows; "values": the value
    # projection's output rows, read by the output projection once per query head of each key/value head (GQA)
    kind: str
    judge: str | None = None  # the module (relative to the block) whose output the scale is judged by
    # None: the statistics come from the linears' own inputs. Otherwise the feed-forward module (a MoE
    # layer, or the dense MLP of a MoE model's block) whose recorded input gives them (quant.awq.experts.FeedForward):
    # its consumers may see different tokens (each expert its routed ones).
    feed_forward: str | None = None


@dataclass(frozen=True)
class Arch:
    blocks: str  # attribute path of the decoder block list, from the CausalLM model
    linears: tuple[str, ...]  # every linear of a block, in execution order
    sequential: tuple[tuple[str, ...], ...]  # linears that share an input, in the order they run
    scale_groups: tuple[ScaleGroup, ...]
    k_proj: str | None
    v_proj: str | None  # the linear that computes the values (a fused qkv_proj where v_fused)
    norm_offset: float = 0.0  # gemma-style RMSNorm computes x * (offset + weight)
    needs_bos: bool = False  # every evaluation window must start with BOS (gemma)
    v_fused: bool = False  # v_proj's last (key/value heads x head size) rows are the values (q, k, v stacked)
    never_quantize: tuple[str, ...] = ("lm_head",)
    # How the family's checkpoints differ from the native transformers class that runs it (remote-code
    # families: names, fused tensors, config); None where they are that class's own checkpoints.
    layout: Layout | None = None
    moe: bool = False  # routed experts (quant.moe.ExpertLinears): one linear per expert and projection
    keep_full: tuple[str, ...] = ()  # linears kept in full precision by design (routers), matched by name suffix
    # (norm, feed-forward module) of a MoE model's blocks: their AWQ scaling groups depend on the block (the
    # experts, shared experts, a dense MLP in the first blocks) and are found in it (quant.awq.experts.feed_forward_groups)
    feed_forward: tuple[str, str] | None = None


def _llama_like(norm_offset: float = 0.0, post_attn_norm: str = "post_attention_layernorm", needs_bos=False) -> Arch:
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    return Arch(
        blocks="model.layers",
        linears=attn + ("self_attn.o_proj",) + mlp_in + ("mlp.down_proj",),
        sequential=(attn, ("self_attn.o_proj",), mlp_in, ("mlp.down_proj",)),
        scale_groups=(
            ScaleGroup("input_layernorm", attn, "norm", judge="self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "values"),
            ScaleGroup(post_attn_norm, mlp_in, "norm", judge="mlp"),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
        ),
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        norm_offset=norm_offset,
        needs_bos=needs_bos,
    )


_LLAMA = _llama_like()
_GEMMA = _llama_like(norm_offset=1.0, post_attn_norm="pre_feedforward_layernorm", needs_bos=True)
_GEMMA1 = _llama_like(norm_offset=1.0, needs_bos=True)

_PHI3 = Arch(
    blocks="model.layers",
    linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    # o_proj and down_proj read only part of a fused output (v, up): no exact fold exists for them.
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "norm", judge="self_attn"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "norm", judge="mlp"),
    ),
    k_proj=None,
    v_proj="self_attn.qkv_proj",
    v_fused=True,
)

_OPT = Arch(
    blocks="model.decoder.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    scale_groups=(
        ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm",
                   judge="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "values"),
        ScaleGroup("final_layer_norm", ("fc1",), "norm"),
        # ReLU is positively homogeneous: scaling fc1's output rows by 1/s and fc2's inputs by s is exact.
        ScaleGroup("fc1", ("fc2",), "linear"),
    ),
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
)

def _moe(layout: Layout, attention: bool = True) -> Arch:
    """A mixture-of-experts row: Llama-style attention, routed experts found at run time (every
    ``nn.Linear`` of a block is quantized), routers and shared-expert gates in full precision, the
    feed-forward scaling groups found in each block. ``attention=False``: an attention of another shape
    (DeepSeek's latent attention: no scaling groups for it)."""
    keep = ("mlp.gate", "mlp.shared_expert_gate")
    ffn = ("post_attention_layernorm", "mlp")
    if not attention:
        return Arch(blocks="model.layers", linears=(), sequential=(), scale_groups=(), k_proj=None, v_proj=None,
                    layout=layout, moe=True, keep_full=keep, feed_forward=ffn)
    return replace(_LLAMA, linears=_LLAMA.linears[:4], sequential=_LLAMA.sequential[:2],
                   scale_groups=_LLAMA.scale_groups[:2], layout=layout, moe=True, keep_full=keep, feed_forward=ffn)


ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    # Remote code on the Hub, Llama in transformers (quant.layouts); "internlm": the first InternLM, and early
    # InternLM2 checkpoints (row_key tells them apart).
    "internlm2": replace(_LLAMA, layout=INTERNLM2),
    "internlm": replace(_LLAMA, layout=INTERNLM1),
    "internlm3": replace(_LLAMA, layout=INTERNLM3),
    "gemma": _GEMMA1,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "phi3": _PHI3,
    "qwen2_moe": _moe(MOE),
    "qwen3_moe": _moe(MOE),
    "olmoe": _moe(MOE),
    "mixtral": _moe(MIXTRAL),
    "deepseek_v2": _moe(MOE, attention=False),
    "deepseek_v3": _moe(MOE, attention=False),
    "opt": _OPT,
}


_LAYOUTS = {row.layout.name: row.layout for row in ARCHITECTURES.values() if row.layout is not None}  # by name


def lookup(model_type: str, where: str = "config.json") -> Arch:
    """The row for ``model_type``, or a :class:`QtoolError` that lists the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise QtoolError(
            f"{where}: model_type {model_type!r} is not supported; supported model types are {supported}"
        ) from None


@dataclass(frozen=True)
class ValueHeads:
    """Where the values are in a value projection: rows ``first_row + h * head_dim ...`` are head ``h``."""

    attention: str  # the attention module, relative to the block
    first_row: int  # 0 for a separate v_proj; after the q and k rows in a fused qkv_proj
    n_kv_heads: int
    head_dim: int


def value_heads(block, v_proj: str, fused: bool = False) -> ValueHeads | None:
    """The value rows of the linear ``v_proj`` in ``block`` (a fused qkv projection if ``fused``),
    or None where its attention module does not give the head layout."""
    attention = v_proj.rpartition(".")[0]
    attn = block.get_submodule(attention)
    head_dim = getattr(attn, "head_dim", None)
    out_f = block.get_submodule(v_proj).out_features
    if not head_dim:
        return None
    if fused:
        n_kv = getattr(attn, "num_key_value_heads", None) or getattr(getattr(attn, "config", None),
                                                                     "num_key_value_heads", None)
    else:
        n_kv = out_f // head_dim if out_f % head_dim == 0 else None
    if not n_kv or n_kv * head_dim > out_f:
        return None
    return ValueHeads(attention, out_f - n_kv * head_dim, n_kv, head_dim)


def row_key(config: dict) -> str:
    """The :data:`ARCHITECTURES` row of a stored ``config.json`` dict: its ``model_type``, except that early
    InternLM2 checkpoints say "internlm" like the first InternLM; their ``architectures`` and ``auto_map`` name
    InternLM2 (``InternLM2ForCausalLM``, ``modeling_internlm2``)."""
    model_type = config.get("model_type", "")
    names = json.dumps([config.get("architectures"), config.get("auto_map")]).lower()
    if model_type == "internlm" and "internlm2" in names:
        return "internlm2"
    return model_type


def layout_of(config: dict) -> Layout | None:
    """The checkpoint layout for a stored ``config.json`` dict, or None for a family transformers runs natively."""
    model_type = row_key(config)
    row = ARCHITECTURES.get(model_type)
    layout = row.layout if row is not None else None
    if layout is not None and layout.only_without_native and has_native_class(model_type):
        return None
    return layout


def spelling(model, module: bool = False):
    """``name -> name`` as the checkpoint ``model`` was read from writes a native tensor name (a module name with
    ``module``): InternLM2's ``model.layers.0.attention.wqkv.weight`` for ``...self_attn.q_proj.weight``, so that
    a message names what the user's files hold. The identity for families transformers runs natively."""
    layout = _LAYOUTS.get(getattr(getattr(model, "config", None), "qtool_checkpoint_layout", None))
    if layout is None:
        return str
    if module:
        return lambda name: layout.stored_name(f"{name}.weight").removesuffix(".weight")
    return layout.stored_name


def has_native_class(model_type: str) -> bool:
    """Whether the installed transformers has its own config class for ``model_type``."""
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def module_of(name: str) -> str:
    """The block's module that holds ``name`` (a path relative to the block): its first component,
    ``"self_attn"`` for ``"self_attn.q_proj"``, ``"mlp"`` for ``"mlp.experts.3.up_proj"``; ``"mlp"`` also for a
    linear held by the block itself, which is its feed-forward (OPT's ``fc1`` and ``fc2``)."""
    first, dot, _ = name.partition(".")
    return first if dot else "mlp"


def blocks_of(model, arch: Arch):
    return model.get_submodule(arch.blocks)
