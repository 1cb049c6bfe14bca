"""Building a full-precision model and its tokenizer from a model folder (no network, no code from the folder),
and the device and dtype they run in. What the folder holds is read by :mod:`quant.folder`."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import torch

from quant.errors import QtoolError
from quant.folder import read_config, tensor_index, weight_files

log = logging.getLogger(__name__)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_causal_lm(model_dir: str | os.PathLike) -> dict:
    """Config of a folder that transformers can load as a causal LM (natively, or through a checkpoint
    layout of :mod:`quant.layouts` for remote-code families), else a clear error."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = read_config(model_dir)
    model_type = cfg.get("model_type")
    if not model_type:
        raise QtoolError(f"{Path(model_dir) / 'config.json'}: has no model_type, so the architecture is unknown")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and _layout(cfg) is None:
        raise QtoolError(
            f"{Path(model_dir) / 'config.json'}: model_type {model_type!r} is not a causal language model "
            "that transformers can load (qtool quantizes decoder-only text generators)"
        )
    model_config(model_dir)
    return cfg


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
    (one sentence) where transformers cannot read it."""
    from transformers import AutoConfig

    cfg = read_config(model_dir)
    where = f"{Path(model_dir) / 'config.json'}"
    try:
        layout = _layout(cfg)
        if layout is not None and layout.config is not None:
            return layout.native_config(cfg, where)
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise QtoolError(f"{where}: transformers cannot read it ({e})") from None


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
    """A full-precision causal LM from a local folder, on the CPU, in one copy (no network)."""
    from transformers import AutoModelForCausalLM

    config = check_causal_lm(model_dir)
    files = weight_files(model_dir)  # a damaged file named in one sentence, before transformers reads it
    if all(f.suffix == ".safetensors" for f in files):
        tensor_index(model_dir, files)
    if _layout(config) is not None:  # a remote-code family: read through its layout, no code from the folder
        from quant import arch
        from quant.source import SourceModel

        src = SourceModel(model_dir, arch.lookup(config["model_type"]).blocks)
        for i in range(len(src.blocks)):
            src.load_block(i)
        return src.model if dtype == "auto" else src.model.to(torch_dtype(dtype))
    kwargs = {"dtype": dtype if dtype == "auto" else torch_dtype(dtype)}
    # transformers initialises missing tensors at random, drops unknown ones and, asked to, re-initialises those of
    # another shape, with a load report: each is refused below in one sentence instead of the report.
    with _without_load_report():
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
    for key, shape, want in sorted(info.get("mismatched_keys") or [])[:1]:
        raise QtoolError(f"{model_dir}: weight {key} has shape {tuple(shape)}, but config.json gives this model "
                         f"{tuple(want)}; the checkpoint does not match its config.json")
    for what, keys in (("lacks", info.get("missing_keys")), ("holds tensors the model does not use:",
                                                               info.get("unexpected_keys"))):
        keys = sorted(keys or [])
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise QtoolError(f"{model_dir}: the checkpoint {what} {', '.join(keys[:3])}{more}"
                             + (" (they would be random weights)" if what == "lacks" else "")
                             + "; it does not match its config.json")
    _check_float_weights(model_dir, model)
    model.eval()
    return model


def _check_float_weights(model_dir, model) -> None:
    """Refuse a safetensors weight stored as integers where the model holds floats: transformers would cast the
    integer codes of an already quantized (or otherwise packed) weight to floats without a word."""
    from safetensors import safe_open

    floats = {k for k, t in model.state_dict().items() if t.is_floating_point()}
    for f in weight_files(model_dir):
        if f.suffix != ".safetensors":
            continue
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                dtype = st.get_slice(k).get_dtype()
                if k in floats and not dtype.startswith(("F", "BF")):
                    raise QtoolError(f"{f}: {k} is stored as {dtype}, but the model holds floats there; a "
                                     "full-precision model's weights are float32, float16 or bfloat16")


@contextlib.contextmanager
def _without_load_report():
    """transformers' load report (the "LOAD REPORT" warning of ``transformers.modeling_utils``) held back; its other
    warnings pass."""
    class Drop(logging.Filter):
        def filter(self, record):
            return "LOAD REPORT" not in record.getMessage()

    logger, drop = logging.getLogger("transformers.modeling_utils"), Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


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
