"""KV-cache quantization settings (frozen, validated) and the calibration file that per-channel keys need.

Calibration file (by default ``qtool/kv_calib.safetensors`` in the model folder, named in its
``config.json``; a subfolder, since loaders read every top-level ``*.safetensors`` of a folder as weights):

* tensors ``layers.{i}.key_min`` and ``layers.{i}.key_max``: float32 ``[kv_heads, head_dim]``, the
  smallest and largest value of each channel of layer ``i``'s keys *as they are cached* (after RoPE
  and any q/k norm), over the calibration tokens. Bits-independent: the scales for 8 or 4 bits are
  derived at load time (``quantizer.channel_qparams``).
* metadata: ``format = "qtool-kv-calib"``, ``version = "1"``, ``model_type``, ``num_layers``,
  ``num_kv_heads``, ``head_dim``, ``n_tokens``.

``config.json`` reference: ``"qtool_kv_cache": {"key_calibration": "qtool/kv_calib.safetensors"}`` (a path
relative to the model folder; files of older qtool versions at the top level are still read, and are not
taken for weights).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quant.config import KV_CALIB_FILE
from quant.errors import QtoolError
from quant.folder import KV_CALIB_FORMAT, KV_CONFIG_KEY, fsync, read_json_object
from quant.output import save_safetensors

KEY_SCHEMES = ("token", "channel")
CALIB_FORMAT, CALIB_VERSION = KV_CALIB_FORMAT, "1"
CALIB_FILENAME = KV_CALIB_FILE
CONFIG_KEY = KV_CONFIG_KEY


@dataclass(frozen=True, eq=False)
class KVCalibration:
    """Per-layer key channel ranges, each ``[kv_heads, head_dim]`` float32."""

    key_min: tuple[torch.Tensor, ...]
    key_max: tuple[torch.Tensor, ...]
    model_type: str = ""
    n_tokens: int = 0
    source: str = ""  # the file it was read from, for error messages

    @property
    def num_layers(self) -> int:
        return len(self.key_min)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.key_min[0].shape)  # type: ignore[return-value]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tensors = {}
        for i, (lo, hi) in enumerate(zip(self.key_min, self.key_max)):
            tensors[f"layers.{i}.key_min"] = lo.float().contiguous().clone()  # a tensor shared by two layers, too
            tensors[f"layers.{i}.key_max"] = hi.float().contiguous().clone()
        heads, head_dim = self.shape
        meta = {"format": CALIB_FORMAT, "version": CALIB_VERSION, "model_type": self.model_type,
                "num_layers": str(self.num_layers), "num_kv_heads": str(heads), "head_dim": str(head_dim),
                "n_tokens": str(self.n_tokens)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            save_safetensors(tensors, tmp, meta)
            fsync(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> KVCalibration:
        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "no such file"
            raise QtoolError(f"{path}: {what}; --kv-calib takes a file written by `qtool kv calibrate`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CALIB_FORMAT:
                    raise QtoolError(f"{path}: is not a KV calibration file (format {meta.get('format')!r}, "
                                     f"expected {CALIB_FORMAT!r}); write one with `qtool kv calibrate`")
                n = int(meta["num_layers"])
                lo = tuple(f.get_tensor(f"layers.{i}.key_min") for i in range(n))
                hi = tuple(f.get_tensor(f"layers.{i}.key_max") for i in range(n))
        except QtoolError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # truncated or foreign: say which
            raise QtoolError(f"{path}: cannot be read as a KV calibration file ({e})") from None
        _check_ranges(path, lo, hi)
        return cls(lo, hi, meta.get("model_type", ""), int(meta.get("n_tokens", 0)), str(path))

    def check_model(self, n_layers: int, kv_heads: int, head_dim: int, model_type: str = "") -> None:
        """Raise a :class:`QtoolError` unless the file fits a model with these dimensions and, where both say it,
        this model type (another model of the same shape and type is not told apart: its key ranges are taken)."""
        where = self.source or "the KV calibration"
        if self.model_type and model_type and self.model_type != model_type:
            raise QtoolError(f"{where}: was calibrated on a {self.model_type} model, but this is a {model_type} "
                             "model; calibrate this model")
        if self.num_layers != n_layers or self.shape != (kv_heads, head_dim):
            raise QtoolError(
                f"{where}: holds {self.num_layers} layers of {self.shape[0]} KV heads x {self.shape[1]} channels, "
                f"but the model has {n_layers} layers of {kv_heads} x {head_dim}; calibrate this model")


def _check_ranges(path: Path, lo: tuple[torch.Tensor, ...], hi: tuple[torch.Tensor, ...]) -> None:
    """One sentence where the ranges cannot be a calibration's: no layers, a tensor that is not ``[kv_heads,
    head_dim]`` like the first layer's, a value that is not finite, or a channel whose minimum is above its
    maximum (the cache would scale by NaN or a negative step and the model's outputs would be blamed)."""
    if not lo:
        raise QtoolError(f"{path}: holds no layers; write the file again with `qtool kv calibrate`")
    for i, (a, b) in enumerate(zip(lo, hi)):
        if a.dim() != 2 or a.shape != lo[0].shape or b.shape != a.shape:
            raise QtoolError(f"{path}: layer {i}'s key ranges have shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                             f"a calibration holds [kv_heads, head_dim] in every layer, like layer 0's "
                             f"{tuple(lo[0].shape)}: write the file again with `qtool kv calibrate`")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise QtoolError(f"{path}: layer {i}'s key ranges hold NaN or inf values; write the file again with "
                             "`qtool kv calibrate`")
        if (a > b).any():
            raise QtoolError(f"{path}: layer {i} has a key channel whose minimum is above its maximum; write the "
                             "file again with `qtool kv calibrate`")


def calibration_reference(model_dir: str | os.PathLike) -> Path | None:
    """The calibration file named in ``model_dir/config.json``, or None. Raises :class:`QtoolError` where
    config.json is not a JSON object, or the entry is not ``{"key_calibration": "relative/path"}`` inside the
    folder, or names no file."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        return None
    entry = read_json_object(cfg_path, "a model's configuration (a JSON object)").get(CONFIG_KEY)
    if entry is None:
        return None
    ref = entry.get("key_calibration") if isinstance(entry, dict) else None
    # inside the folder by its path, not by where it resolves: a Hugging Face cache snapshot links every file to a blob
    inside = isinstance(ref, str) and ref and not os.path.isabs(ref) and not os.path.normpath(ref).startswith("..")
    if not inside:
        raise QtoolError(f"{cfg_path}: {CONFIG_KEY} is {json.dumps(entry)[:80]}; qtool reads "
                         f'{{"key_calibration": "{CALIB_FILENAME}"}} (a file in the model folder) there')
    if not (Path(model_dir) / ref).is_file():
        raise QtoolError(f"{cfg_path}: {CONFIG_KEY} names {ref}, which is not in the folder; run `qtool kv "
                         "calibrate` on it again, or pass --kv-calib FILE")
    return Path(model_dir) / ref


def write_calibration_reference(model_dir: str | os.PathLike, calib_path: str | os.PathLike) -> None:
    """Name ``calib_path`` (which must lie in ``model_dir``) in ``model_dir/config.json``: the file is written
    beside it under a temporary name, flushed to disk and renamed over it (the keys keep their order; the mode
    is kept). Temporary files that a run killed at this step left are removed first."""
    model_dir, calib_path = Path(model_dir).resolve(), Path(calib_path).resolve()
    rel = os.path.relpath(calib_path, model_dir)
    cfg_path = model_dir / "config.json"
    for stale in model_dir.glob(_CONFIG_TMP + "*"):
        stale.unlink(missing_ok=True)
    config = read_json_object(cfg_path, "a model's configuration (a JSON object)")
    config[CONFIG_KEY] = {"key_calibration": rel}
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=_CONFIG_TMP)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
        fsync(Path(tmp))
        os.chmod(tmp, cfg_path.stat().st_mode & 0o7777)  # mkstemp's 0600 would lock other readers out
        os.replace(tmp, cfg_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_CONFIG_TMP = ".config.json.qtool-"  # write_calibration_reference's temporary file


@dataclass(frozen=True)
class KVCacheConfig:
    """How the cache stores keys and values.

    ``bits``: 8 or 4. ``keys``: ``"token"`` (online per (token, head) groups) or ``"channel"``
    (static per-channel scales from ``calibration``). Values are always per (token, head).
    ``window``: the most recent ``window`` tokens of each layer stay in full precision.
    """

    bits: int = 8
    keys: str = "token"
    window: int = 0
    calibration: KVCalibration | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in (4, 8):
            raise QtoolError(f"--kv bits {self.bits!r} are not supported; use int8 or int4")
        if self.keys not in KEY_SCHEMES:
            raise QtoolError(f"--kv-keys {self.keys!r} is not a key scheme; use 'token' or 'channel'")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise QtoolError(f"--kv-window {self.window!r} must be a whole number of tokens, 0 or more")
        if self.calibration is not None and not isinstance(self.calibration, KVCalibration):
            raise QtoolError(f"calibration is {self.calibration!r}; pass KVCalibration.load(path), or the path "
                             "to parse_kv(..., calib=path)")
        if self.keys == "channel" and self.calibration is None:
            raise QtoolError("--kv-keys channel needs per-channel key ranges: pass --kv-calib FILE "
                             "(written by `qtool kv calibrate MODEL_DIR`) or calibrate the model folder")

    def with_(self, **changes) -> KVCacheConfig:
        return replace(self, **changes)

    @property
    def name(self) -> str:
        w = f", fp window {self.window}" if self.window else ""
        return f"int{self.bits} KV ({self.keys} keys{w})"


KV_PRESETS = {"int8": KVCacheConfig(bits=8), "int4": KVCacheConfig(bits=4)}


def parse_kv(kind: str, keys: str = "token", window: int = 0,
             calib: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None) -> KVCacheConfig:
    """Build a config from CLI-style strings: ``kind`` is ``int8`` or ``int4``.

    Per-channel keys read ``calib``, else the file named in ``model_dir/config.json``.
    """
    if kind not in KV_PRESETS:
        raise QtoolError(f"--kv {kind!r} is not a KV cache type; use int8 or int4")
    calibration = None
    if calib is not None:
        calibration = KVCalibration.load(calib)
    elif keys == "channel" and model_dir is not None:
        ref = calibration_reference(model_dir)
        if ref is not None:
            calibration = KVCalibration.load(ref)
    if calibration is not None and keys == "token":
        raise QtoolError("--kv-calib holds per-channel key ranges, which only --kv-keys channel uses; "
                         "add --kv-keys channel or drop --kv-calib")
    return KV_PRESETS[kind].with_(keys=keys, window=window, calibration=calibration)
