"""The output folder of a run: written beside its final name and renamed into place whole (:func:`atomic_output`),
kept apart from the source model (:func:`check_apart`), replacing only an earlier checkpoint (:func:`check_replaceable`),
and a stopped run's folder resumed or removed. The source folder is never written."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from quant.checkpoint import is_quantized_checkpoint
from quant.config import KV_CALIB_FILE, REFUSED_SEARCH_FILE, SEARCH_FILE
from quant.errors import QtoolError
from quant.folder import new_file_mode

log = logging.getLogger(__name__)


_OWNER = ".qtool-owner"  # in a temporary output folder: "<host> <pid>" of the run writing it


def _abandoned(parent: Path, name: str) -> list[Path]:
    """Temporary output folders for ``name`` whose run is gone (killed: no cleanup ran)."""
    host, found = os.uname().nodename, []
    for d in sorted(parent.glob(f".{name}.tmp-*")):
        try:
            owner_host, pid = (d / _OWNER).read_text().split()
            if owner_host != host:
                continue
            if pid == "stopped":  # interrupted, kept for resuming (atomic_output)
                found.append(d)
                continue
            os.kill(int(pid), 0)  # raises if no such process
        except ProcessLookupError:
            found.append(d)
        except (OSError, ValueError):
            continue  # no owner file yet, or not ours to judge
    return found


def _partial_to_resume(out: Path, resume_key: dict | None, restart: bool) -> Path | None:
    """A stopped run's folder to continue (same key), after removing the ones that cannot be continued.
    Raises QtoolError for a resumable folder made with another key (unless ``restart``)."""
    from quant import resume

    reuse = None
    for d in _abandoned(out.parent, out.name):
        if resume_key is not None and not restart and resume.saved_key(d) is not None and reuse is None:
            resume.check_partial(d, resume_key, out)
            reuse = d
            continue
        log.warning("removing %s, left by an earlier run that was stopped before it finished", d)
        shutil.rmtree(d, ignore_errors=True)
    return reuse


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then the permissions any new file gets under the umask (safetensors writes
    0600: a server running as another user could not read the file)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, new_file_mode())


def check_apart(out: Path, source: str | os.PathLike) -> None:
    """Refuse an output folder that overlaps the source model's: the same folder, a folder inside it
    (writing would pollute it) or a folder holding it (``--overwrite`` would delete it), symlinks
    followed. Raises :class:`QtoolError` before anything is written or removed."""
    o, s = Path(out).resolve(), Path(source).resolve()
    if o == s:
        raise QtoolError(f"{out}: the output folder is the source model; choose another -o so the source stays untouched")
    if s in o.parents:
        raise QtoolError(f"{out}: the output folder is inside the source model {source}; choose a folder outside it")
    if o in s.parents:
        raise QtoolError(f"{out}: the output folder contains the source model {source} (replacing it would delete "
                         "the source); choose a folder outside it")
    if s.is_dir():  # files linked from elsewhere (the Hugging Face cache: snapshots/ -> ../../blobs/)
        for f in s.iterdir():
            r = f.resolve()
            if r == o or o in r.parents:
                raise QtoolError(f"{out}: the output folder holds {f.name} of the source model {source} (through a "
                                 "symbolic link); choose a folder outside it")


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None,
                  resume_key: dict | None = None, restart: bool = False):
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one rename.

    On an error ``out`` is left as it was. The temporary folder is kept where ``resume_key`` is
    given, the folder holds a progress record (:mod:`quant.resume`) and the run stopped before
    it finished: by Ctrl-C, an OS error (a full disk), or any other error (a bug, a GPU out of
    memory), so that no error throws away finished blocks; the next call with the same
    ``resume_key`` yields it again to continue, and ``restart`` removes it instead. A
    :class:`QtoolError` (a refusal, which a rerun would meet again) removes it, as does any
    error after the run finished. Raises QtoolError for a folder left with another key.
    """
    from quant import resume

    if not str(out).strip():
        raise QtoolError("-o is blank; give the folder the checkpoint is written to")
    out = Path(out).resolve()  # "ck/sub/.." is ck, and a link's target is what gets replaced, not the link
    if source is not None:
        check_apart(out, source)
    if out.exists() and not overwrite:
        raise QtoolError(f"{out}: already exists; choose another -o"
                         + (" or pass --overwrite to replace it" if out.is_dir() else " (it is a file, which "
                            "--overwrite does not replace)"))
    if out.exists():
        check_replaceable(out)
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise QtoolError(f"{parent}: is a file, so the output folder cannot be made in it; choose another -o")
    if not parent.is_dir():
        raise QtoolError(f"{parent}: the folder for the output does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise QtoolError(f"{parent}: is not writable, so {out.name} cannot be created there")
    tmp = _partial_to_resume(out, resume_key, restart)
    if tmp is None:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        except OSError as e:  # a read-only or pseudo file system that access() passed (/proc, a full disk)
            raise QtoolError(f"{parent}: a folder cannot be created there ({e.strerror}); choose another -o") from None
        tmp.chmod(new_file_mode(folder=True))  # mkdtemp makes it 0700: a server running as another user could not read it
    (tmp / _OWNER).write_text(f"{os.uname().nodename} {os.getpid()}")
    keep = finished = False
    try:
        yield tmp
        finished = True
        if out.exists() and not overwrite:  # another run wrote it while this one worked
            # not kept for a resume: the finished folder's block parts are already merged into its shards
            raise QtoolError(f"{out}: appeared while this run worked (another run wrote it) and is left as it is; "
                             "choose another -o or pass --overwrite to replace it")
        (tmp / _OWNER).unlink()
        resume.remove(tmp)
        if out.exists():
            check_replaceable(out)  # what appeared meanwhile too
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except QtoolError:
        raise
    except BaseException as e:
        keep = not finished and resume_key is not None and (tmp / resume.PROGRESS).is_file()
        if keep:
            (tmp / _OWNER).write_text(f"{os.uname().nodename} stopped")  # the next run may take it
            if not isinstance(e, KeyboardInterrupt):  # Ctrl-C: the block loop says what is kept
                log.warning("%s: the run failed (%s) after %s; that work is kept in %s beside it: run the same command "
                            "again to continue from there, or pass --restart to start over", out, type(e).__name__,
                            _finished_work(tmp), tmp.name)
        raise
    finally:
        if tmp.exists() and not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _finished_work(tmp: Path) -> str:
    """What a stopped run's progress record in ``tmp`` holds, in words ("3 finished blocks")."""
    from quant import resume

    try:
        n = json.loads((tmp / resume.PROGRESS).read_text())["blocks_done"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its last progress record"
    return f"{n} finished block{'s' * (n != 1)}" if n else "its loss-gradient pass (no block finished)"


def _foreign_folder(out: Path) -> str | None:
    """What in checkpoint folder ``out`` is no checkpoint's: a checkpoint is files, qtool's ``qtool/`` holding
    only its search files and KV-cache calibration (stale for new weights: replaced with them), and the ``.cache/huggingface/`` that ``huggingface-cli download --local-dir``
    leaves. Anything else in a subfolder (another checkpoint, the user's results) is named; ``None`` if none."""
    own = {"qtool": {Path(SEARCH_FILE).name, Path(REFUSED_SEARCH_FILE).name, Path(KV_CALIB_FILE).name},
           ".cache": {"huggingface"}}
    for p in sorted(out.iterdir()):
        if not p.is_dir() or p.is_symlink():
            continue
        if p.name not in own:
            return f"the folder {p.name}/"
        extra = sorted(c.name for c in p.iterdir() if c.name not in own[p.name])
        if extra:
            return f"{p.name}/{extra[0]}"
    return None


def check_replaceable(out: Path) -> None:
    """What ``--overwrite`` may replace: an earlier quantized checkpoint (``quantization_config`` in its
    ``config.json``, or an older tool's ``quantize_config.json`` / ``quant_config.json``) or an empty folder;
    never a file, a full-precision model, a folder of other files (``-o`` typed wrong, an empty shell variable),
    a checkpoint holding a folder of its own (another checkpoint, results put there) or a folder that holds the
    working directory. Raises :class:`QtoolError` (one sentence) otherwise."""
    if not out.is_dir():
        raise QtoolError(f"{out}: exists and is a file; --overwrite replaces folders only")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise QtoolError(f"{out}: is the working folder or holds it; --overwrite will not replace it, so choose "
                         "another -o")
    entries = sorted(p.name for p in out.iterdir())
    try:
        checkpoint = not entries or is_quantized_checkpoint(out)
    except (QtoolError, TypeError):  # no readable config.json (or not an object): not a checkpoint
        checkpoint = False
    if checkpoint:
        foreign = _foreign_folder(out)
        if foreign is None:
            return
        raise QtoolError(f"{out}: holds {foreign}, which is not part of a checkpoint and --overwrite would delete it; "
                         "move it out first, or choose another -o")
    what = "a full-precision model" if "config.json" in entries else \
        f"files that are not a checkpoint ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})"
    raise QtoolError(f"{out}: holds {what}; --overwrite replaces only an earlier quantized checkpoint or an empty "
                     "folder, so choose another -o")
