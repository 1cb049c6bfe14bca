"""Reading model folders (config, weight files, tokenizer, side files). The source folder is only ever read;
the output folder is written by :mod:`quant.output`."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from quant.errors import QtoolError

log = logging.getLogger(__name__)

# quant.kv.config's calibration file: its header's format, and the config.json entry that names it
KV_CALIB_FORMAT, KV_CONFIG_KEY = "qtool-kv-calib", "qtool_kv_cache"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
# Everything a deployment needs beside the weights: tokenizer, chat template, generation defaults.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
MAX_SHARD_BYTES = 4 * 10**9  # "4GB", as --max-shard-size writes it
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def read_config(model_dir: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a model folder, with one-sentence errors for the usual mistakes."""
    if not str(model_dir).strip():  # an unset shell variable: Path("") would be the working folder
        raise QtoolError("the model folder is blank; give the path of a Hugging Face model folder")
    path = Path(model_dir)
    if not path.exists():
        raise QtoolError(f"{path}: no such folder; give the path of a Hugging Face model folder")
    if not path.is_dir():
        raise QtoolError(f"{path}: is a file, not a folder; give the folder that holds config.json")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise QtoolError(f"{path}: has no config.json, so it is not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise QtoolError(f"{cfg_path}: is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise QtoolError(f"{cfg_path}: holds a JSON {type(cfg).__name__}, not an object of settings "
                         "({\"model_type\": ...})")
    return cfg


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The folder's weight files: its top-level ``*.safetensors`` (a KV-cache calibration that older qtool
    versions wrote there left out), else ``.bin`` files. Raises QtoolError where there are none."""
    path = Path(model_dir)
    for pattern in WEIGHT_PATTERNS:
        files = sorted(f for f in path.glob(pattern) if not is_side_file(f))
        if files:
            return files
    raise QtoolError(f"{path}: holds no weights (*.safetensors or pytorch_model*.bin)")


def is_side_file(f: Path) -> bool:
    """Whether ``f``, a top-level file of a model folder, is one of qtool's side files, which hold no weights:
    ``qtool_*`` (the AWQ search of checkpoints made before it moved to ``qtool/``) or a KV-cache calibration
    of `qtool kv calibrate` (its safetensors header says so; older versions wrote it there)."""
    return f.name.startswith("qtool_") or (f.suffix == ".safetensors" and is_kv_calibration(f))


def is_kv_calibration(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file whose header says it is a KV calibration (no tensor is read; a
    missing or damaged file is not one: its readers say what is wrong)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as st:
            return (st.metadata() or {}).get("format") == KV_CALIB_FORMAT
    except Exception:  # noqa: BLE001 - not safetensors, damaged, missing
        return False


SHARD_INDEX = "model.safetensors.index.json"


def check_shard_index(model_dir: str | os.PathLike, index: dict[str, Path]) -> None:
    """Refuse, in one sentence, a ``model.safetensors.index.json`` that disagrees with the shards' headers
    (``index``: tensor name -> the file holding it): transformers and vLLM load by the index, so a shard it names
    that is missing, or a tensor it places in another file or that no file holds, breaks them while a reader
    that globs the shards sees a whole model. No index: nothing to check."""
    path = Path(model_dir) / SHARD_INDEX
    if not path.is_file():
        return
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise QtoolError(f"{path}: cannot be read ({type(e).__name__}); it should be JSON with a weight_map") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise QtoolError(f"{path}: its weight_map is {json.dumps(weight_map)[:80]}; it should map each tensor to "
                         "its shard's file name")
    for name in sorted(set(weight_map.values())):
        if not (Path(model_dir) / name).is_file():
            raise QtoolError(f"{path}: names the shard {name}, which is not in the folder; copy the whole model "
                             "folder again")
    for key, name in sorted(weight_map.items()):
        held = index.get(key)
        if held is None or held.name != name:
            where = f"it is in {held.name}" if held is not None else "no shard holds it"
            raise QtoolError(f"{path}: places {key} in {name}, but {where}; the index does not match the shards")
    unlisted = sorted(set(index) - set(weight_map))
    if unlisted:
        raise QtoolError(f"{path}: lists no shard for {unlisted[0]} (held by {index[unlisted[0]].name}); loaders "
                         "that read the index would miss it")


def safetensors_keys(f: Path) -> list[str]:
    """The tensor names of safetensors file ``f`` (its header read, its size checked against it). Raises
    QtoolError naming the file where it is damaged or cut short."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as st:
            return list(st.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds for a damaged or truncated file
        raise unreadable(f, e) from None


def unreadable(f: Path, e: Exception) -> QtoolError:
    """The one sentence for a weight file that its library could not read: the file, and the reason's first line
    (torch's weights-only refusals run to pages)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return QtoolError(f"{f}: cannot be read as a weight file ({type(e).__name__}: {first})")


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


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in ``text`` such as ``"500MB"`` or ``"2GiB"``, read as Hugging Face reads ``max_shard_size``
    (transformers' ``convert_file_size_to_int``). Raises QtoolError for anything else, or under 1 MB."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(str(text).strip())
    except ValueError:
        raise QtoolError(f"{what} {text!r} is not a size; write e.g. 500MB, 4GB or 2GiB") from None
    if n < 10**6:
        raise QtoolError(f"{what} {text!r} is below 1MB; shards that small only multiply files")
    return n


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "special_tokens_map.json")


def has_tokenizer_files(model_dir: str | os.PathLike) -> bool:
    """Whether the folder holds any of a tokenizer's files (a broken link counts; a weights-only folder holds
    none) that a run can check by loading it: a sentencepiece ``tokenizer.model`` alone needs the sentencepiece
    package, and where that is not installed it is not loaded here (it is copied as it is)."""
    path = Path(model_dir)
    present = [n for n in TOKENIZER_FILES if os.path.lexists(path / n)]
    if present and "tokenizer.json" not in present and (path / "tokenizer.model").is_file():
        import importlib.util

        return importlib.util.find_spec("sentencepiece") is not None
    return bool(present)


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
    index = {k: f for f in files if f.suffix == ".safetensors" for k in safetensors_keys(f)}
    if all(f.suffix == ".safetensors" for f in files):
        check_shard_index(model_dir, index)
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


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer, chat template and generation files, and the remote-code modules that
    ``auto_map`` in config.json / tokenizer_config.json names (InternLM2's ``modeling_internlm2.py``...:
    copied, never run, so that loaders with ``trust_remote_code`` read the checkpoint as the original).
    Returns the names copied."""
    copied = []
    for name in SIDE_FILES + tuple(_auto_map_modules(src)):
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
            copied.append(name)
    return copied


def _auto_map_modules(folder: str | os.PathLike) -> list[str]:
    """The ``*.py`` files ``auto_map`` entries point at (``"module.Class"``, or lists of them)."""
    names = []
    for cfg_name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((Path(folder) / cfg_name).read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for ref in auto_map.values() if isinstance(auto_map, dict) else []:
            for r in ref if isinstance(ref, list) else [ref]:
                if isinstance(r, str) and "." in r and "--" not in r:  # "repo--module.Class" lives elsewhere
                    names.append(r.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return sorted(set(names))


def folder_bytes(path: str | os.PathLike, patterns=("*.safetensors", "*.bin")) -> int:
    """Bytes of the weight files in ``path`` that a load reads: the first pattern with any files (a folder
    shipping both ``.safetensors`` and ``.bin`` loads the former); qtool's side files (:func:`is_side_file`) are not weights."""
    for p in patterns:
        files = [f for f in Path(path).glob(p) if not is_side_file(f)]
        if files:
            return sum(f.stat().st_size for f in files)
    return 0


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
