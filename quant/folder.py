"""What a Hugging Face model folder holds, read from its files without building a model: config.json, the
weight files (and which top-level files are qtool's side files, not weights), the shard index, the tokenizer's
files, and the files a checkpoint copies from its source. The source folder is only ever read; the output folder
is written by :mod:`quant.output`."""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from pathlib import Path

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


def new_file_mode(folder: bool = False) -> int:
    """The permissions a new file (or folder) gets under the process's umask: what files written by a library
    that creates them 0600 (safetensors, mkstemp, mkdtemp) are set to, so that a server running as another
    user can read them. (Reading the umask means setting it: it is set back at once.)"""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def fsync(path: Path) -> None:
    """Flush the file or folder ``path`` to disk (before a rename makes it visible, or after one in a folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def path_argument(value, what: str = "the model folder") -> None:
    """Raise QtoolError where ``value`` (a path given to the Python API) is no str or os.PathLike (None, a
    number): Path() and open() would raise TypeError deep inside the call."""
    if not isinstance(value, (str, os.PathLike)):
        raise QtoolError(f"{what} is {repr(value)[:40]}, not a path; give it as a string or pathlib.Path")


def read_config(model_dir: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a model folder, with one-sentence errors for the usual mistakes."""
    path_argument(model_dir)
    if not str(model_dir).strip():  # an unset shell variable: Path("") would be the working folder
        raise QtoolError("the model folder is blank; give the path of a Hugging Face model folder")
    path = Path(model_dir)
    if not path.exists():
        raise QtoolError(f"{path}: no such folder; give the path of a Hugging Face model folder")
    if not path.is_dir():
        raise QtoolError(f"{path}: is a file, not a folder; give the folder that holds config.json")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        if cfg_path.exists() or cfg_path.is_symlink():
            raise QtoolError(f"{cfg_path}: {_not_a_file(cfg_path)}; config.json must be a file")
        raise QtoolError(f"{path}: has no config.json, so it is not a Hugging Face model folder")
    return read_json_object(cfg_path, 'an object of settings ({"model_type": ...})')


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in file ``path``; QtoolError (one sentence naming the file, and ``what`` it should hold)
    where it is not UTF-8 text, not valid JSON, or holds another JSON value than an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QtoolError(f"{path}: is not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise QtoolError(f"{path}: is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}), so not "
                         f"JSON; it should hold {what}") from None
    if not isinstance(value, dict):
        raise QtoolError(f"{path}: holds a JSON {json_type(value)}, not {what}")
    return value


def json_type(value) -> str:
    """The JSON name of a parsed value's type (``null``, ``array``, ...), as a file's author wrote it."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The folder's weight files: the shards ``model.safetensors.index.json`` names where there is one (as
    transformers and vLLM read it: another ``*.safetensors`` beside them, such as a Mistral repository's
    ``consolidated.safetensors``, is left out with a warning), else its top-level ``*.safetensors`` (a KV-cache
    calibration that older qtool versions wrote there left out), else ``.bin`` files. Raises QtoolError where there
    are none, or where the index is damaged or names a shard that is not there. ``.bin`` shards are read by
    ``pytorch_model.bin.index.json`` where there is one, as transformers reads them (another ``.bin`` beside
    them is left out with a warning)."""
    path = Path(model_dir)
    for f in sorted({f for p in WEIGHT_PATTERNS for f in path.glob(p)}):  # a FIFO would block the first read
        if not f.is_file():
            raise QtoolError(f"{f}: {_not_a_file(f)}; a weight file must be a regular file (or a link to one)")
    safetensors = any(not is_side_file(f) for f in path.glob("*.safetensors"))
    indexes = ((SHARD_INDEX, ("*.safetensors",), "model.safetensors", "transformers and vLLM"),
               (BIN_SHARD_INDEX, WEIGHT_PATTERNS[1:], "pytorch_model.bin", "transformers"))
    for index, patterns, single, readers in indexes:
        if index == BIN_SHARD_INDEX and safetensors:  # safetensors files are read before any .bin
            break
        if (weight_map := _weight_map(path, index)) is None:
            continue
        files = [path / name for name in sorted(set(weight_map.values()))]
        others = sorted({f.name for p in patterns for f in path.glob(p) if f not in files and not is_side_file(f)})
        if single in others:  # transformers reads it before the index (vLLM, for safetensors, the index)
            raise QtoolError(f"{path}: holds {single} beside {index}, which does not name it: transformers would "
                             "load the one, an index reader the shards; remove the one that is stale")
        if others:
            _warn_once(f"{path}: {', '.join(others)} not named in {index}; left out, as {readers} "
                       f"leave{'s' if readers == 'transformers' else ''} {'it' if len(others) == 1 else 'them'} out")
        return files
    for pattern in WEIGHT_PATTERNS:
        files = sorted(f for f in path.glob(pattern) if not is_side_file(f))
        if files:
            return files
    raise QtoolError(f"{path}: holds no weights (*.safetensors or pytorch_model*.bin)")


def tied_tensors_differ(where, copy: str, owner: str) -> QtoolError:
    """The sentence for a checkpoint that stores ``copy`` (a tied lm_head) with other values than ``owner`` (the
    embedding) while config.json ties the two: transformers would use the stored one, vLLM and the tie the other."""
    return QtoolError(f"{where}: stores {copy} with other values than {owner}, but config.json ties the two "
                      "(tie_word_embeddings); loaders disagree on which to use: set tie_word_embeddings to false in "
                      f"config.json or remove {copy}")


def _not_a_file(f: Path) -> str:
    """What ``f``, which is no regular file, is instead, for a sentence."""
    if f.is_symlink() and not f.exists():
        return "is a link to nothing"
    return "is a folder" if f.is_dir() else "is not a regular file (a FIFO, socket or device)"


def is_side_file(f: Path) -> bool:
    """Whether ``f``, a top-level file of a model folder, is one of qtool's side files, which hold no weights:
    ``qtool_*`` (the AWQ search of checkpoints made before it moved to ``qtool/``) or a KV-cache calibration
    of `qtool kv calibrate` (its safetensors header says so; older versions wrote it there)."""
    return f.name.startswith("qtool_") or (f.suffix == ".safetensors" and is_kv_calibration(f))


def is_kv_calibration(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file whose header says it is a KV calibration (no tensor is read; a
    missing or damaged file is not one: its readers say what is wrong)."""
    from safetensors import safe_open

    if not Path(path).is_file():  # a FIFO would block the read; a folder or a link to nothing is none either
        return False
    try:
        with safe_open(str(path), framework="pt") as st:
            return (st.metadata() or {}).get("format") == KV_CALIB_FORMAT
    except Exception:  # noqa: BLE001 - not safetensors, damaged, missing
        return False


SHARD_INDEX = "model.safetensors.index.json"
BIN_SHARD_INDEX = "pytorch_model.bin.index.json"


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    log.warning("%s", message)


def _weight_map(model_dir: Path, index: str = SHARD_INDEX) -> dict[str, str] | None:
    """The shard index ``index``'s weight_map (tensor name -> shard file name), each shard checked to be in the
    folder; None without an index. Raises QtoolError (one sentence) for a damaged index or a missing shard."""
    path = model_dir / index
    if not path.is_file():
        return None
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise QtoolError(f"{path}: cannot be read ({type(e).__name__}); it should be JSON with a weight_map") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise QtoolError(f"{path}: its weight_map is {json.dumps(weight_map)[:80]}; it should map each tensor to "
                         "its shard's file name")
    weight_map = {k: v.removeprefix("./") for k, v in weight_map.items()}  # "./shard" names the same file
    for name in sorted(set(weight_map.values())):
        if "/" in name or not (model_dir / name).is_file():
            raise QtoolError(f"{path}: names the shard {name}, which is not in the folder; copy the whole model "
                             "folder again")
    return weight_map


def tensor_index(model_dir: str | os.PathLike, files: list[Path]) -> dict[str, Path]:
    """Tensor name -> the file holding it, over the safetensors ``files`` of ``model_dir`` (:func:`weight_files`;
    headers read only), checked against the shard index (:func:`check_shard_index`). Raises QtoolError naming
    both files where two hold the same tensor (which one a loader takes is its own choice), and naming the file
    where one is damaged."""
    index: dict[str, Path] = {}
    for f in files:
        for key in safetensors_keys(f):
            if index.setdefault(key, f) != f:
                raise QtoolError(f"{model_dir}: {key} is in both {index[key].name} and {f.name}; loaders would take "
                                 "either: keep one of the files")
    check_shard_index(model_dir, index)
    return index


def check_shard_index(model_dir: str | os.PathLike, index: dict[str, Path]) -> None:
    """Refuse, in one sentence, a ``model.safetensors.index.json`` that disagrees with the shards' headers
    (``index``: tensor name -> the file holding it, over the files the index names): transformers and vLLM load
    by the index, so a tensor it places in another file or that no file holds breaks them while a reader that
    globs the shards sees a whole model. No index: nothing to check."""
    path = Path(model_dir) / SHARD_INDEX
    weight_map = _weight_map(Path(model_dir))
    if weight_map is None:
        return
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
    shipping both ``.safetensors`` and ``.bin`` loads the former), or the shards a shard index names
    (:func:`weight_files`); qtool's side files (:func:`is_side_file`) are not weights."""
    if "*.safetensors" in patterns and (Path(path) / SHARD_INDEX).is_file():
        return sum(f.stat().st_size for f in weight_files(path))
    for p in patterns:
        files = [f for f in Path(path).glob(p) if not is_side_file(f)]
        if files:
            return sum(f.stat().st_size for f in files)
    return 0
