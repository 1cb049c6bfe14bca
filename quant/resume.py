"""Resuming a stopped quantization run where it stopped.

The temporary output folder of a run (``.<out>.tmp-*`` beside ``out``) holds, besides
the finished blocks (:mod:`quant.shards`), a progress record written after every block:

* ``progress.json``: the run's key (every setting, the device kind, a digest of qtool's
  code, a fingerprint of the source: :func:`run_key`), how many blocks are finished, the
  summary rows and the plan so far;
* ``state-<blocks done>.safetensors``: what the next block needs: the calibration hidden states after
  the last finished block (search, accept and guard windows) and the guard windows'
  hidden states through the all-RTN model; and the calibration windows' token ids, so
  that a resumed run neither tokenizes the text again nor sees other text than the
  blocks before it (an edited calibration file changes nothing until ``--restart``).

Each state is written under its own name (``state-<blocks done>.safetensors``, a temporary
name, fsync, rename) after the block's parts are on disk; then ``progress.json``, which
names it, replaces the previous one atomically; then the previous state is deleted. The
record's rename is the one commit point, so after kill -9, a power cut or Ctrl-C at any
instant the record and the state it names describe the same finished blocks. Re-running the same command finds the folder (its owner process is
gone), checks the key, and continues at the first unfinished block; the result is
bit-identical to an uninterrupted run's. A folder left by a run with other settings,
other code or a changed source is refused with one sentence naming the difference;
``restart=True`` (``--restart``) removes it and starts over.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quant.errors import QtoolError
from quant.folder import fsync
from quant.shards import write_safetensors

PROGRESS = "progress.json"
CALIB_IDS = "calibration.ids"  # the run's calibration windows in its state: int64 [windows, seqlen]


def _state_name(blocks_done: int) -> str:
    return f"state-{blocks_done:05d}.safetensors"


def code_digest() -> str:
    """sha256 of qtool's Python sources (``quant/``, ``calib/``): a partial run is resumed by the same code."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(p for d in ("quant", "calib") for p in (root / d).rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def file_digest(path) -> str:
    """SHA-256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_key(settings: dict, device: str, source_fingerprint: str) -> dict:
    """What must be equal for a partial run to be continued."""
    return {"settings": json.loads(json.dumps(settings, default=str)), "device": device, "code": code_digest(),
            "source": source_fingerprint}


# The fields named before others where several differ: those that make a stopped run unresumable by any command,
# then those that the other differences follow from (a method brings its options; a replay has no search options).
_FIRST = ("code", "source", "device", "settings.method", "settings.awq.search_digest")


def _differences(old, new, path: str = ""):
    """``(path, old value, new value)`` of every leaf where two keys differ, in the keys' sorted order."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            yield from _differences(old.get(k), new.get(k), f"{path}.{k}" if path else k)
    elif old != new:
        yield path, old, new


def first_difference(old, new) -> str | None:
    """A phrase naming the field where two keys differ that matters most (:data:`_FIRST`, then the first in
    sorted order), or None when they are equal."""
    path, old, new = min(_differences(old, new), default=(None, None, None),
                         key=lambda d: _FIRST.index(d[0]) if d[0] in _FIRST else len(_FIRST))
    if path is None:
        return None
    if path == "settings.awq.search_digest":  # the key holds the replayed file's content, not its path
        if old is None:
            return "the stopped run searched and this one replays a search file (--apply-search)"
        if new is None:
            return "the stopped run replayed a search file (--apply-search) and this one searches"
        return "the search file given to --apply-search holds another search than the stopped run replayed"
    names = {"code": "qtool's code changed since", "source": "the source model's files changed since",
             "device": f"the device kind was {old}, now {new}, in"}
    if path in names:
        return f"{names[path]} the stopped run"
    return f"{path.removeprefix('settings.')} was {old!r} in the stopped run, {new!r} now"


def saved_key(folder: Path) -> dict | None:
    """The run key of a partial run's folder, or None if it holds no usable progress record (none, a damaged one,
    or one whose state file is missing or damaged: such a folder cannot be continued)."""
    try:
        record = json.loads((folder / PROGRESS).read_text())
        with safe_open(str(folder / record["state"]), framework="pt"):  # its header and size checked
            pass
        return record["key"]
    except Exception:  # noqa: BLE001 - json, the OS and safetensors raise many kinds for a damaged record
        return None


def check_partial(folder: Path, key: dict, out: Path) -> None:
    """Refuse, in one sentence, to continue a partial run made with another key."""
    old = saved_key(folder)
    diff = first_difference(old, key)
    if not diff:
        return
    if old and all(old.get(k) == v for k, v in key.items() if k != "settings"):  # only the options differ
        how = "rerun the stopped run's command to resume it"
    else:  # the code, the source's files or the device: no command resumes it
        how = "it resumes only with the code, the source model's files and the device it ran with"
    raise QtoolError(f"{out}: a stopped run left {folder.name} beside it, but {diff}; {how}, or pass --restart to "
                     "start over")


def _temporary(path: Path) -> Path:
    """The name ``path`` is written under until it is whole (:func:`_atomic_write`)."""
    return path.with_name(f".{path.name}.tmp")


def _atomic_write(path: Path, write) -> None:
    tmp = _temporary(path)
    write(tmp)
    fsync(tmp)
    os.replace(tmp, path)


def save(folder: Path, key: dict, blocks_done: int, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The progress record after ``blocks_done`` finished blocks: ``record`` (JSON-able) and ``tensors``."""
    state = _state_name(blocks_done)
    _atomic_write(folder / state, lambda p: write_safetensors(p, {k: t.cpu() for k, t in tensors.items()}))
    payload = {"key": key, "blocks_done": blocks_done, "state": state, **record}
    _atomic_write(folder / PROGRESS, lambda p: p.write_text(json.dumps(payload, default=str)))
    # The record no longer names them; a stopped run's half-written state (under its temporary name) goes too.
    for old in [*folder.glob("state-*.safetensors"), *folder.glob(_temporary(Path("state-*.safetensors")).name)]:
        if old.name != state:
            old.unlink(missing_ok=True)


def load(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """``(record, tensors)`` of a partial run's folder, or None where it holds none. Raises QtoolError (one
    sentence) where the state the record names is missing or damaged."""
    if not (folder / PROGRESS).is_file():
        return None
    record = json.loads((folder / PROGRESS).read_text())
    try:
        return record, load_file(str(folder / record["state"]))
    except Exception as e:  # noqa: BLE001 - a missing or damaged file: safetensors and the OS raise many kinds
        raise QtoolError(f"{folder}: the stopped run's saved state cannot be read ({type(e).__name__}: "
                         f"{str(e)[:100]}); pass --restart to start over") from None


def remove(folder: Path) -> None:
    """The progress record and its state out of ``folder`` (a write a kill cut short left its temporary file under
    the name the resumed run writes again, so none is left behind: test)."""
    (folder / PROGRESS).unlink(missing_ok=True)
    for state in folder.glob("state-*.safetensors"):
        state.unlink()
