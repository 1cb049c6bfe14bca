"""Loading a quantized checkpoint (ours, AutoAWQ "gemm", or GPTQ) as a transformers model."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from quant import folder, model_io, qmath
from quant.arch import spelling
from quant.checkpoint import checkpoint_headers, tensor_index
from quant.errors import QtoolError
from quant.formats.compat import declared_kept
from quant.formats.spec import CheckpointSpec, read_spec
from quant.gptq_checkpoints import read_leaf, read_qzeros, resolve_convention
from quant.modules import QuantLinear
from quant.moe import swap_in_expert_linears
from quant.ranges import converted

log = logging.getLogger(__name__)
_QUANT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
_PACKED_LEAVES = ("qweight", "qzeros", "scales")  # what marks a linear as quantized
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names


def _swap_in_quant_linears(model: nn.Module, names: set[str], spec: CheckpointSpec) -> None:
    for name in sorted(names):
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise QtoolError(f"checkpoint tensors {name}.qweight/scales/qzeros belong to no module of this "
                             "architecture") from None
        if not isinstance(lin, nn.Linear):
            raise QtoolError(f"checkpoint tensors {name}.qweight/scales/qzeros sit on a {type(lin).__name__}, not a "
                             "Linear")
        # a bias where the model has one (config.json says: attention_bias, ...): a stored bias the model has no
        # place for is a tensor it does not use, as transformers and vLLM drop it
        q = QuantLinear(lin.in_features, lin.out_features, spec.bits, spec.group_size, spec.format,
                        lin.bias is not None, device="meta")
        model.set_submodule(name, q)


def rebuild_nonpersistent_buffers(model: nn.Module, within: nn.Module | None = None) -> None:
    """RoPE frequencies and similar buffers are not in checkpoints: recompute them as transformers does.

    Only non-persistent buffers still on the meta device are rebuilt, those of ``within`` (a submodule of
    ``model``; default: all of it). Persistent buffers left on the meta device (a streamed model's
    released blocks) are not touched."""
    within = model if within is None else within
    owners = []
    for owner in within.modules():
        for leaf in list(owner._non_persistent_buffers_set):
            buf = owner._buffers.get(leaf)
            if buf is not None and buf.is_meta:
                owner._buffers[leaf] = torch.empty_like(buf, device="cpu")
                owners.append(owner)
    if not owners:
        return
    # transformers' initializers leave alone any tensor flagged as already initialized.
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta and not any(t is b for o in owners for b in o._buffers.values()):
            t._is_hf_initialized = True
    for owner in owners:
        model._init_weights(owner)


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _skeleton(path: str | os.PathLike, dtype: torch.dtype | str | None):
    """The model ``config.json`` describes, on the meta device, with a :class:`QuantLinear` wherever the
    checkpoint stores a quantized linear (any of its qweight, qzeros, scales); with the checkpoint's
    spec, its tensor reader, the quantized linears' names, the dtype of what is not packed and what chose it
    (``--dtype float16``, ``config.json's dtype bfloat16``)."""
    from transformers import AutoModelForCausalLM

    from quant.arch import layout_of

    spec = read_spec(path)
    layout = layout_of(folder.read_config(path))
    config = model_io.model_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # our modules do the dequantization, not transformers' integrations
    why = "--dtype {}"  # what chose the dtype, for an overflow's sentence
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float16
        why = "config.json's dtype {}" if getattr(config, "dtype", None) else "the default dtype {}"
    dtype = model_io.torch_dtype(dtype)
    reason = why.format(str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    swap_in_expert_linears(model)  # routed experts as per-expert linears, as qtool writes them
    reader = _Reader(tensor_index(path), layout, config, spec)
    reader.ignore = model_io.ignored_on_load(model)
    index = reader.native_index()
    names = {prefix for prefix, _, leaf in map(lambda k: k.rpartition("."), index) if leaf in _PACKED_LEAVES}
    _swap_in_quant_linears(model, names, spec)
    return model, spec, reader, names, dtype, reason


def check_tensors(path: str | os.PathLike, model: nn.Module, reader: _Reader, names: set[str], spec) -> None:
    """Refuse, in one sentence, a checkpoint whose tensors (read from the safetensors headers) do not fit the
    model its ``config.json`` describes: a tensor the model does not use, one it needs that is missing (a
    GPTQ ``g_idx`` may be left out; a tied head is the embedding), or one of another shape than the layer
    sizes and ``quantization_config`` (bits, group size) give. Packed tensors (qweight, qzeros) must be int32.
    ``model`` is :func:`_skeleton`'s; shapes are compared where the checkpoint stores the native class's
    tensors (a remote-code family's fused tensors are checked as they are split, at load)."""
    expected = model.state_dict(keep_vars=True)
    spell = spelling(model)  # a message names what the files hold (InternLM2's feed_forward.w2, Mixtral's w1)
    headers = checkpoint_headers(reader.stored)
    given = {}
    for k, (f, shape, dtype) in headers.items():
        native = reader.layout.native_names(k, reader.shape) if reader.layout is not None else [k]
        for n in native:
            if reader.ignore is None or not reader.ignore.search(n):
                # a tensor stored as one native tensor (renamed at most) has its shape; a fused one is checked
                # as it is split, at load (_assign_tensors)
                given[n] = (f, shape if len(native) == 1 else None, dtype)
    if reader.layout is None:  # names as stored: the config's exclusions name them so
        declared = declared_kept(spec.config, sorted(names))
        listed = spec.config.get("modules_to_not_convert")
        if isinstance(listed, list):  # transformers' own rule too: a prefix up to a module boundary, a regex, a suffix
            declared.setdefault("modules_to_not_convert", set()).update(
                n for n in names if any(_transformers_keeps(n, k) for k in listed if isinstance(k, str)))
        for key, kept in declared.items():
            for n in sorted(kept)[:1]:
                raise QtoolError(f"{path}: config.json's quantization_config.{key} keeps {n} in full precision, but "
                                 f"the checkpoint stores it quantized ({n}.qweight); loaders that read {key} would "
                                 "build a full-precision layer there and miss its weight")
    for name in sorted(names):
        in_f, scales = model.get_submodule(name).in_features, given.get(f"{name}.scales", (None, None))[1]
        if spec.group_size != -1 and in_f % spec.group_size and scales is not None \
                and scales[0] == -(-in_f // spec.group_size):  # AutoGPTQ's ceil(in / g) groups
            raise QtoolError(f"{path}: {name} has {in_f} input features, not a multiple of quantization_config's "
                             f"group size {spec.group_size}; its last group would be partial, which qtool (like "
                             "vLLM) does not read")
    _check_dynamic(path, spec, names)
    unexpected = sorted(n for n in given if n not in expected)
    if unexpected:
        f = given[unexpected[0]][0]
        raise QtoolError(f"{f}: holds {_tensors(len(unexpected))} the model does not use, e.g. {spell(unexpected[0])}; "
                         "the checkpoint does not match its config.json")
    for n, (f, shape, dtype) in sorted(given.items()):
        prefix, _, leaf = n.rpartition(".")
        want = tuple(expected[n].shape)
        if shape is not None and tuple(shape) != want:
            why = f"quantization_config's bits={spec.bits} and group size {spec.group_size} with the layer" \
                if prefix in names and leaf in _QUANT_LEAVES else "config.json's layer"
            raise QtoolError(f"{f}: {spell(n)} has shape {list(shape)}, but {why} sizes make it {list(want)}; the "
                             "checkpoint does not match its config.json")
        if prefix in names and leaf in ("qweight", "qzeros") and dtype != "I32":
            raise QtoolError(f"{f}: {spell(n)} is {dtype}, but packed {leaf} tensors are int32")
        if expected[n].is_floating_point() and dtype not in _FLOAT_DTYPES:
            raise QtoolError(f"{f}: {spell(n)} is {dtype}, but the model's {leaf} is a floating-point tensor (float32, "
                             "float16 or bfloat16)")
    aliases: dict[int, list[str]] = {}
    for k, t in expected.items():
        aliases.setdefault(id(t), []).append(k)
    missing = sorted(k for k, t in expected.items() if not any(a in given for a in aliases[id(t)])
                     and not (k.endswith(".g_idx") and k.removesuffix(".g_idx") in names
                              and (not spec.act_order or spec.group_size == -1)))  # one group: no order to hold
    if missing:
        why = " (act-order: desc_act is true, so each input channel's group is only in g_idx)" \
            if missing[0].endswith(".g_idx") else ""
        raise QtoolError(f"{path}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. "
                         f"{spell(missing[0])}{why}")
    _check_g_idx(reader, names, expected)


def _check_dynamic(path, spec, names: set[str]) -> None:
    """Refuse a GPTQModel ``dynamic`` override (``"+:regex"`` or a bare regex, matched from the start of a module's
    name) that gives a quantized module other bits, group size, sym or desc_act: qtool reads one setting per
    checkpoint. A rule that matches none of them, or repeats the checkpoint's settings, is read."""
    settings = {"bits": spec.bits, "group_size": spec.group_size, "desc_act": spec.act_order}
    if spec.sym is not None:
        settings["sym"] = spec.sym
    for rule, override in (spec.config.get("dynamic") or {}).items():
        if str(rule).startswith("-:") or not isinstance(override, dict):
            continue
        changed = [f"{k}={json.dumps(v)}" for k, v in override.items() if k in settings and v != settings[k]]
        if not changed:
            continue
        try:
            pattern = re.compile(str(rule).removeprefix("+:"))
        except re.error:
            continue
        hit = next((n for n in sorted(names) if pattern.match(n)), None)
        if hit:
            raise QtoolError(f"{path}: quantization_config.dynamic rule {rule!r} sets {', '.join(changed)} for {hit}; "
                             "qtool reads one bits, group size, sym and desc_act per checkpoint")


def _check_g_idx(reader: _Reader, names: set[str], expected: dict) -> None:
    """Refuse a GPTQ ``g_idx`` (each input channel's group) that names a group the layer's scales do not hold:
    an index past the end failed deep in the dequantization, a negative one read the last group silently."""
    for name, g_idx in read_leaf(reader.stored, [n for n in names if f"{n}.scales" in expected], "g_idx"):
        n_groups = expected[f"{name}.scales"].shape[0]
        if g_idx.numel() and not (0 <= int(g_idx.min()) and int(g_idx.max()) < n_groups):
            bad = int(g_idx.min()) if int(g_idx.min()) < 0 else int(g_idx.max())
            raise QtoolError(f"{reader.stored[f'{name}.g_idx']}: {name}.g_idx holds group {bad}, but the layer's "
                             f"scales hold groups 0 to {n_groups - 1}; the checkpoint is damaged")


def _transformers_keeps(name: str, key: str) -> bool:
    """Whether transformers' ``should_convert_module`` (quantizers_utils, 5.2x) leaves module ``name`` unconverted
    for the ``modules_to_not_convert`` entry ``key``: ``key`` as a regex from the start up to a module boundary,
    or as a plain suffix (a key that is no valid regex: as literal text)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        starts = re.match(rf"(?:{key}){boundary}", name) is not None
    except re.error:
        starts = re.match(rf"(?:{re.escape(key)}){boundary}", name) is not None
    return starts or name.endswith(key)


def check_checkpoint(path: str | os.PathLike) -> None:
    """:func:`check_tensors` of the checkpoint in folder ``path`` (headers only: no weight is read)."""
    model, spec, reader, names, _, _ = _skeleton(path, None)
    check_tensors(path, model, reader, names, spec)


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         compact: bool | None = None):
    """A transformers causal LM whose quantized linears are :class:`QuantLinear`, ready for ``generate()``.

    ``dtype`` is the dtype of everything that is not packed (default: the checkpoint's).
    ``compact`` keeps each layer's codes only in the CUDA kernels' layout (see
    :meth:`QuantLinear.compact`; ``state_dict()`` still gives the checkpoint's tensors). The
    default is on for a CUDA ``device`` with the compiled kernels loaded. Raises QtoolError (one
    sentence, before any weight is read) for a checkpoint that does not fit its config.json
    (:func:`check_tensors`).
    """
    folder.path_argument(path, "the checkpoint folder")
    device = model_io.parse_device(device)  # a bad value in one sentence, before any weight is read
    model, spec, reader, names, dtype, reason = _skeleton(path, dtype)
    check_tensors(path, model, reader, names, spec)
    if spec.format.quant_method == "gptq":  # v1 or v2 zeros: the declaration, checked against the tensors
        spec = resolve_convention(spec, read_qzeros(reader.stored, {k.removesuffix(".qweight") for k in reader.stored
                                                                    if k.endswith(".qweight")}), str(path))
        for name in names:  # v1 and v2 hold the same tensors: only how the zero points are read differs
            model.get_submodule(name).format = spec.format
    loaded = _assign_tensors(model, reader, names, dtype, reason)
    loaded |= _default_g_idx(model, names)
    expected = set(model.state_dict())
    model.tie_weights()
    missing = sorted(k for k in expected - loaded if model.get_parameter_or_buffer(k).is_meta)
    if missing:
        raise QtoolError(f"{path}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
    rebuild_nonpersistent_buffers(model)
    model.to(device)
    model.eval()
    if compact is None:
        from quant.kernels import loader

        compact = torch.device(device).type == "cuda" and loader.cuda_kernels_available()
    if compact:
        done = sum(model.get_submodule(n).compact(dtype) for n in names)
        log.info("%d of %d quantized linears hold only the kernels' copy of their codes", done, len(names))
    log.info("loaded %s: %d quantized linears (%s, %d-bit)", path, len(names), spec.format.title, spec.bits)
    return model


def _default_g_idx(model: nn.Module, names: set[str]) -> set[str]:
    """GPTQ checkpoints without act-order may omit ``g_idx``: it is then input channel // group size."""
    filled = set()
    for name in names:
        q = model.get_submodule(name)
        if "g_idx" in q._buffers and q.g_idx.is_meta:
            g = qmath.effective_group_size(q.in_features, q.group_size)
            q.g_idx = torch.arange(q.in_features, dtype=torch.int32) // g
            filled.add(f"{name}.g_idx")
    if filled:
        log.info("%d GPTQ layers carry no g_idx: using the sequential group order", len(filled))
    return filled


class _Reader:
    """A checkpoint's tensors file by file, under the native class's names (:mod:`quant.layouts`: a
    remote-code family's names mapped, its fused q, k, v split once all of their tensors are read)."""

    def __init__(self, stored: dict, layout, config, spec: CheckpointSpec):
        from quant.layouts import Shape

        self.stored, self.layout, self.spec = stored, layout, spec
        self.shape = Shape.of(config) if layout is not None else None
        self.ignore = None  # what transformers drops on load (model_io.ignored_on_load), once the model is built

    def native_index(self) -> dict:
        if self.layout is None:
            return self.stored
        return {n: f for k, f in self.stored.items() for n in self.layout.native_names(k, self.shape)}

    def _group(self, name: str) -> str | None:
        fused = self.layout.fused_qkv if self.layout is not None else None
        return name.rsplit(f".{fused}.", 1)[0] if fused and f".{fused}." in name else None

    def shards(self):
        """``(file, {native name: tensor})`` per file; a fused projection comes with the file that
        completes it."""
        pending: dict[str, dict] = {}
        want = {}
        for k in self.stored:
            if (g := self._group(k)) is not None:
                want.setdefault(g, set()).add(k)
        for f in sorted(set(self.stored.values())):
            shard = {}
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    g = self._group(k)
                    if g is None:
                        shard[k] = st.get_tensor(k)
                    else:
                        pending.setdefault(g, {})[k] = st.get_tensor(k)
            for g in [g for g, got in pending.items() if set(got) == want[g]]:
                shard.update(pending.pop(g))
            if self.layout is not None:
                shard = self.layout.to_native(shard, self.shape, self.spec.format, self.spec.bits,
                                              self.spec.group_size)
            if self.ignore is not None:
                shard = {k: t for k, t in shard.items() if not self.ignore.search(k)}
            yield f, shard


def _assign_tensors(model: nn.Module, reader: _Reader, quant_names: set[str], dtype: torch.dtype,
                    reason: str) -> set[str]:
    """Load every tensor file by file (one copy in memory); floats that are not packed become ``dtype`` (chosen by
    ``reason``, e.g. ``--dtype float16``: said where a value is beyond its range)."""
    loaded: set[str] = set()
    spell = spelling(model)  # a message names what the files hold
    expected = model.state_dict(keep_vars=True)  # the skeleton's shapes (loading assigns tensors of the same ones)
    shared: dict[int, list[str]] = {}  # parameters the skeleton ties (a tied lm_head): stored twice, one value
    for k, t in expected.items():
        shared.setdefault(id(t), []).append(k)
    tied = {k: names for names in shared.values() if len(names) > 1 for k in names}
    tied_values: dict[str, torch.Tensor] = {}
    for f, shard in reader.shards():
        for k, t in shard.items():
            prefix, _, leaf = k.rpartition(".")
            if t.is_floating_point() and not (prefix in quant_names and leaf in _QUANT_LEAVES):
                shard[k] = converted(t, dtype, spell(k), why=reason)
            if k not in tied:
                continue
            other = next((n for n in tied[k] if n in tied_values), None)
            tied_values[k] = shard[k]  # the model holds it once loaded: no second copy
            if other is not None and not torch.equal(tied_values[other], shard[k]):
                owner, copy = sorted((k, other), key=tied[k].index)  # the embedding, then the head tied to it
                raise folder.tied_tensors_differ(Path(f).parent, spell(copy), spell(owner))
        for k, t in sorted(shard.items()):  # a fused tensor's parts, split: load_state_dict would raise a traceback
            if k in expected and tuple(t.shape) != tuple(expected[k].shape):
                what = f"{spell(k)} gives {k} the shape" if spell(k) != k else f"{k} has shape"
                raise QtoolError(f"{f}: {what} {list(t.shape)}, but config.json's layer sizes and quantization_config "
                                 f"make it {list(expected[k].shape)}; the checkpoint does not match its config.json")
        result = model.load_state_dict(shard, strict=False, assign=True)
        if result.unexpected_keys:
            raise QtoolError(f"{f}: holds {_tensors(len(result.unexpected_keys))} the model does not use, e.g. "
                             f"{sorted(result.unexpected_keys)[0]}; the checkpoint does not match its config.json")
        loaded |= set(shard) - set(result.unexpected_keys)
    return loaded
