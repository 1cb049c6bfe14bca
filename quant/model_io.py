"""Building a full-precision model and its tokenizer from a model folder (no network, no code from the folder),
and the device and dtype they run in. What the folder holds is read by :mod:`quant.folder`."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from quant.errors import QtoolError
from quant.folder import read_config

log = logging.getLogger(__name__)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_causal_lm(model_dir: str | os.PathLike) -> dict:
    """Config of a folder that transformers can load as a causal LM (natively, or through a checkpoint
    layout of :mod:`quant.layouts` for remote-code families), else a clear error (:func:`model_config`)."""
    model_config(model_dir)
    return read_config(model_dir)


def _check_model_type(cfg: dict, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = cfg.get("model_type")
    if not model_type:
        raise QtoolError(f"{where}: has no model_type, so the architecture is unknown")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and _layout(cfg) is None:
        raise QtoolError(f"{where}: model_type {model_type!r} is not a causal language model that transformers can "
                         "load (qtool quantizes decoder-only text generators)")


def _check_top_k(cfg: dict, where: str) -> None:
    """Refuse a MoE config whose ``num_experts_per_tok`` routes each token to no expert (every MoE layer would add
    nothing: a perplexity printed for another model), to more experts than there are, or is no whole number
    (transformers' config class fails on it in a traceback). Sources and checkpoints alike."""
    experts = next((cfg[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if cfg.get(k)), None)
    top_k = cfg.get("num_experts_per_tok")
    if experts is None or top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not isinstance(experts, int) \
            or not 1 <= top_k <= experts:
        raise QtoolError(f"{where}: num_experts_per_tok {top_k!r} is not a number of experts each token is routed "
                         f"to; use 1 to the {experts!r} experts")


def _layout(cfg: dict):
    from quant.arch import layout_of

    return layout_of(cfg)


def ignored_on_load(model) -> re.Pattern | None:
    """What transformers drops from a checkpoint on load without a word (so may qtool): the model class's
    ``_keys_to_ignore_on_load_unexpected`` and the tensors older checkpoints carry for buffers that are no longer
    stored, per-layer rotary ``inv_freq`` and ``position_ids``, where the model has such buffers (the rule of
    transformers' ``PreTrainedModel._adjust_missing_and_unexpected_keys``). A pattern to ``search`` tensor names
    with, or None."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    buffers = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None


def model_config(model_dir: str | os.PathLike):
    """The transformers config qtool builds the model from: the folder's own, or for a remote-code
    family the native class's config mapped from it (no code from the folder runs). QtoolError
    (one sentence) where transformers cannot read it, or its ``model_type`` is no causal language model."""
    from transformers import AutoConfig

    cfg = read_config(model_dir)
    where = f"{Path(model_dir) / 'config.json'}"
    _check_model_type(cfg, where)
    _check_top_k(cfg, where)
    for key in ("dtype", "torch_dtype"):  # what the model computes in, as transformers reads it
        value = cfg.get(key)
        if value is not None and not (isinstance(value, str) and value in _DTYPES):
            raise QtoolError(f"{where}: {key} {json.dumps(value)} is not a dtype a model is loaded in; write "
                             f"{', '.join(_DTYPES)}, or leave the entry out")
    try:
        layout = _layout(cfg)
        if layout is not None and layout.config is not None:
            return layout.native_config(cfg, where)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        if layout is not None:  # names as the checkpoint stores them (Mixtral's w1), for messages: arch.spelling
            config.qtool_checkpoint_layout = layout.name
        return config
    except (ValueError, OSError, KeyError, TypeError) as e:
        first = str(e).strip().split("\n\n")[0]  # transformers' advice to upgrade or install from git follows
        raise QtoolError(f"{where}: transformers cannot read it ({first})") from None


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device a ``--device`` value names: ``auto`` (or None) is the GPU where one is visible, else the CPU.

    Raises QtoolError (one sentence) for a value that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and for
    ``cuda`` where no CUDA GPU is visible."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise QtoolError(f"--device {device!r} is not a device qtool runs on; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QtoolError(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
    return dev


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The floating-point dtype ``name`` gives ("float32", "float16", "bfloat16", or a torch float dtype).
    Raises QtoolError for any other value (an integer dtype: weights are computed in floats)."""
    dtype = name if isinstance(name, torch.dtype) else _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None or not dtype.is_floating_point:
        raise QtoolError(f"dtype {name!r} is not one qtool computes in; use one of {', '.join(_DTYPES)}")
    return dtype


def load_tokenizer(model_dir: str | os.PathLike):
    """The model folder's tokenizer (no network, no code from the folder); one sentence if none loads.

    A tokenizer that ``tokenizer_config.json`` maps to remote code (``auto_map``, e.g. InternLM2's
    ``InternLM2Tokenizer``) is read from the folder's ``tokenizer.json`` by transformers' generic fast
    tokenizer instead.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(model_dir)
    try:
        remote = "AutoTokenizer" in (json.loads((path / "tokenizer_config.json").read_text()).get("auto_map") or {})
    except (OSError, ValueError, AttributeError):
        remote = False
    try:
        if remote and (path / "tokenizer.json").is_file():
            log.info("%s: tokenizer_config.json maps the tokenizer to remote code; reading tokenizer.json with "
                     "transformers' generic fast tokenizer instead (no code from the folder runs)", model_dir)
            return PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, ImportError... for a missing or unusable one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QtoolError(f"{model_dir}: has no tokenizer that loads without running code from the folder "
                         "(tokenizer.json, or tokenizer.model with tokenizer_config.json); copy the original model's "
                         f"tokenizer files there ({first[:160]})") from None
    if not tok("a b", add_special_tokens=False)["input_ids"]:  # transformers builds an empty one from config alone
        raise QtoolError(f"{model_dir}: its tokenizer turns text into no tokens (no tokenizer.json or vocabulary "
                         "files in the folder?); copy the original model's tokenizer files there")
    return tok


def load_fp_model(model_dir: str | os.PathLike, dtype: str | torch.dtype = "auto"):
    """A full-precision causal LM from a local folder, on the CPU, in one copy (no network, no code from the folder).

    Read as the quantization pipeline reads its source (:class:`quant.source.SourceModel`): every check that
    needs no tensor data (tensors missing, extra, stored as integers, or of another shape than ``config.json``
    gives) runs on the file headers before any weight is read, so a wrong folder is refused in one sentence at
    once, and ``qtool ppl`` accepts exactly the folders the methods accept. Every floating tensor is converted to
    ``dtype`` as it is read; ``"auto"``, as transformers reads it: config.json's ``dtype``, else the stored one.
    Raises :class:`QtoolError` for each of those, for unreadable weight files and for NaN or inf weights.
    """
    from quant.source import SourceModel

    check_causal_lm(model_dir)
    return SourceModel(model_dir, None, dtype=dtype if dtype == "auto" else torch_dtype(dtype)).model


def check_seqlen(model, seqlen: int) -> None:
    """Refuse windows of ``seqlen`` tokens that a model with learned position embeddings has no rows for.

    Rotary models take any length (their quality past the trained length is the user's call); a learned
    table (OPT's ``embed_positions``, GPT-2's ``wpe``) would fail with an index error deep in the forward.
    Raises :class:`QtoolError` naming the longest length that fits.
    """
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    learned = any(n.endswith(("embed_positions", "wpe")) for n, _ in model.named_modules())
    if learned and max_pos and seqlen > max_pos:
        raise QtoolError(f"--seqlen {seqlen}: this model has learned position embeddings for {max_pos} positions; "
                         f"use --seqlen {max_pos} or less")
