"""AWQ's saved search results (:data:`quant.config.SEARCH_FILE`): finding, reading and checking the file.

The file holds ``<block>.<linear>.awq_scale`` and ``.awq_clip`` tensors (safetensors) and, in its header, the
model and settings the search was made for (:func:`search_metadata`); a replay refuses another model or setting.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from quant.arch import module_of
from quant.awq.search import MIN_CLIP
from quant.config import REFUSED_SEARCH_FILE, SEARCH_FILE, QuantConfig
from quant.errors import QtoolError

log = logging.getLogger(__name__)


def search_path(path) -> Path:
    """The search file that ``path`` names: the file itself, or the one inside a checkpoint folder (or inside
    the checkpoint's ``qtool/`` folder)."""
    given = Path(path)
    path = given
    if given.is_dir():
        candidates = (given / SEARCH_FILE, given / Path(SEARCH_FILE).name,
                      given / "qtool_search.safetensors")  # where qtool before 2026-11-30 saved it
        path = next((c for c in candidates if c.is_file()), candidates[0])
    refused = next((r for r in (given / REFUSED_SEARCH_FILE, given / Path(REFUSED_SEARCH_FILE).name) if r.is_file()),
                   None) if given.is_dir() else None
    if not path.is_file() and refused is not None:
        raise QtoolError(f"{given}: holds only the search of a model the whole-model check did not keep, {refused}; "
                         "give that file to replay it")
    if not path.is_file():
        raise QtoolError(f"{given}: {'holds no' if given.is_dir() else 'no such'} search results file; give an AWQ "
                         f"checkpoint folder made by qtool (it holds {SEARCH_FILE}) or that file")
    return path


@contextlib.contextmanager
def _open_search(path: Path):
    from safetensors import safe_open

    try:
        f = safe_open(str(path), "pt")
    except Exception as e:  # safetensors' own error type: a header it cannot read
        raise QtoolError(f"{path}: is not a safetensors search results file ({e}); give the "
                         f"{SEARCH_FILE} of an AWQ checkpoint made by qtool") from None
    with f:
        yield f


def check_readable(path: Path) -> None:
    """Refuse, in one sentence, a file that is not a safetensors file (its header is read, no tensor)."""
    with _open_search(path):
        pass


def load_search(path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The search results in ``path`` (a search file, or the checkpoint folder holding it as
    :data:`quant.config.SEARCH_FILE`) whose keys start with ``prefix``, with the prefix removed.

    Raises :class:`QtoolError` when there is no such file."""
    path = search_path(path)
    with _open_search(path) as f:
        if not list(f.keys()):
            _log_once_empty(str(path))
        found = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    for key, t in found.items():
        _check_values(path, prefix + key, t)
    return found


SCALE_NORM_TOLERANCE = 0.02  # max·min of a saved scale within 2% of 1: float32 gives 1 ± 2e-7, bfloat16 storage ± 0.4%


def _check_values(path: Path, key: str, t: torch.Tensor) -> None:
    """One sentence for a search entry no search writes: a scale (divides a linear's input) must be finite and
    positive with ``max · min = 1`` (every candidate scale is normalised so, llm-awq's convention: a scaled or
    edited file breaks it), a clip (the fraction of each group's range kept) in [``MIN_CLIP``, 1] (a clip of
    1e-30 made every group scale of its linear 0 in float16: a model of zero weights); both float."""
    from quant.awq.fold import CLIP_KEY, SCALE_KEY

    kind = key.rsplit(".", 1)[-1]
    if kind not in (SCALE_KEY, CLIP_KEY):
        return  # unknown entries are refused by name where the block is applied
    ok = t.is_floating_point() and bool(torch.isfinite(t).all())
    if ok:
        ok = bool((t > 0).all()) if kind == SCALE_KEY else bool(((t >= MIN_CLIP) & (t <= 1)).all())
    if not ok:
        want = ("finite positive floats" if kind == SCALE_KEY
                else f"floats from {MIN_CLIP:g} to 1 (the fraction of a group's range kept)")
        raise QtoolError(f"{path}: entry {key!r} holds {_describe(t)}; a search writes {want} there; search again")
    if kind == SCALE_KEY and t.numel():
        norm = float(t.double().max() * t.double().min())
        if abs(norm - 1.0) > SCALE_NORM_TOLERANCE:
            raise QtoolError(f"{path}: entry {key!r} has max x min = {norm:.3g}, but a search normalises every scale to "
                             "max x min = 1; the file was changed after its search; search again")


def _describe(t: torch.Tensor) -> str:
    if not t.is_floating_point():
        return f"{t.dtype} values"
    bad = ~torch.isfinite(t)
    if bad.any():
        return f"non-finite values ({int(bad.sum())} of {t.numel()})"
    return f"values from {t.min().item():.3g} to {t.max().item():.3g}"


SEARCH_HEADER = "qtool_awq_search"


_PROBE_VALUES = 16  # values of a weight matrix that identify the model a search was made for
# The same weights stored as bfloat16 (rounded to 8 significant bits: at most 2^-9 off) still match; a fine-tune's
# change of a few tenths of a percent does not, in 16 values of every linear.
_PROBE_RTOL = 2.0 ** -8
PROBE_KEY = "awq_source_weights"  # per block in the search file: [weight matrices, _PROBE_VALUES] float32


def _probe_values(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, _PROBE_VALUES).round().long()
    return flat[idx].float().cpu()


def _matrices(block: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The block's weight matrices (2-D parameters), in ``named_parameters`` order: what the probes read."""
    return [(n, p) for n, p in block.named_parameters() if p.dim() == 2]


def _far(was: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
    """Indices (``nonzero``) where a saved probe ``was`` differs from this model's ``now`` beyond :data:`_PROBE_RTOL`."""
    return ((was.float() - now).abs() > _PROBE_RTOL * now.abs() + 1e-6 * float(now.abs().max())).nonzero()


def block_probe(block: torch.nn.Module) -> torch.Tensor:
    """:data:`_PROBE_VALUES` evenly spaced values of every weight matrix of the full-precision ``block`` (in
    ``named_parameters`` order), float32 ``[matrices, _PROBE_VALUES]``: saved with each block's search results
    as :data:`PROBE_KEY`, so that a replay refuses a model that differs from the searched one in any linear."""
    return torch.stack([_probe_values(p) for _, p in _matrices(block)])


def check_block_probe(where: str, saved: torch.Tensor, block: torch.nn.Module) -> None:
    """Refuse ``block`` (full precision) where its :func:`block_probe` differs from ``saved`` beyond
    :data:`_PROBE_RTOL`; the :class:`QtoolError`'s sentence begins with ``where``."""
    names = [n for n, _ in _matrices(block)]
    if saved.dim() != 2 or saved.shape != (len(names), _PROBE_VALUES) or not bool(torch.isfinite(saved).all()):
        raise QtoolError(f"{where}: entry {PROBE_KEY!r} holds {tuple(saved.shape)} values where a search writes "
                         f"{_PROBE_VALUES} finite ones for each of the block's {len(names)} weight matrices; search again")
    now = block_probe(block)
    far = _far(saved, now)
    if len(far):
        r, c = (int(x) for x in far[0])
        raise QtoolError(f"{where}: the search was made on other weights than this model's ({names[r]} holds "
                         f"{now[r, c].item():.6g} where the searched model's held {saved[r, c].item():.6g}); replay it "
                         "on the model it was made for, or search again")


def weight_probe(name: str, weight: torch.Tensor) -> dict:
    """What identifies a model's weights in a search file: ``name`` (the first block's first weight matrix) and
    :data:`_PROBE_VALUES` of its values, evenly spaced over it, as float32 rounded to 7 digits. Another model of
    the same shape (a sibling size's fine-tune, another seed) differs there; the same weights in another dtype
    match within :data:`_PROBE_RTOL`."""
    return {"tensor": name, "values": [float(f"{float(v):.7g}") for v in _probe_values(weight)]}


def first_weight(block: torch.nn.Module) -> str:
    """The name (within ``block``) of its first weight matrix, the one :func:`weight_probe` reads."""
    return _matrices(block)[0][0]


def search_metadata(cfg: QuantConfig, model_type: str, n_blocks: int, probe: dict | None = None) -> dict[str, str]:
    """The settings a search was made for, and the :func:`weight_probe` of the model it was made on, for the
    search file's safetensors header: one key whose value is sorted JSON (safetensors writes several header keys
    in no fixed order, and the file must be bit-identical from run to run). A block with no entries in the file
    kept round-to-nearest."""
    made_for = _settings(cfg, model_type, n_blocks)
    if probe is not None:
        made_for["weights"] = probe
    if cfg.skip:  # the linears the search never saw: a replay must keep them too, or they get plain RTN
        made_for["skip"] = sorted(cfg.skip)
    return {SEARCH_HEADER: json.dumps(made_for, sort_keys=True)}


def _settings(cfg: QuantConfig, model_type: str, n_blocks: int) -> dict:
    return {"model_type": model_type, "blocks": n_blocks, "bits": cfg.bits, "group_size": cfg.group_size,
            "sym": cfg.sym}


def _made_for(meta: dict) -> str:
    zero = "symmetric" if meta["sym"] else "with zero points"
    return (f"a {meta['model_type']} model of {meta['blocks']} blocks at {meta['bits']}-bit, group size "
            f"{meta['group_size']}, {zero}")


def check_search_file(path, cfg: QuantConfig, model_type: str, n_blocks: int, probe: dict | None = None,
                      blocks: str | None = None, linears: list[str] | None = None,
                      spell: Callable[[str], str] = str) -> bool:
    """Refuse a search file made for another model or other settings (:func:`search_metadata`), which would
    otherwise give round-to-nearest silently to every block it lacks, or scales and clips fitted to other weights
    of the same shape (``probe``: this model's :func:`weight_probe`). ``spell``: a skipped module's name as
    the user writes it (a layout family's stored name for the native one), for the messages. A file from a qtool
    before 2026-12-03 carries no settings: it is accepted with a warning (its tensors' shapes are still checked per
    block); one from before 2026-12-04 carries no weight probe, and only its settings are checked.
    Returns whether the file said its settings.

    ``blocks`` (the blocks' module path, ``model.layers``): every entry must belong to one of the ``n_blocks``
    blocks; one outside them (a deeper model's block, ``lm_head``) would be ignored. ``linears`` (the full names
    of the blocks' linears): the search's ``--skip`` and this run's are compared by the linears they name
    (``down_proj`` and ``mlp.down_proj`` are the same skip); without it, as written.

    Raises :class:`QtoolError` (one sentence) on a mismatch, a damaged header or a missing file."""
    path = search_path(path)
    with _open_search(path) as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
    if blocks is not None:
        inside = re.compile(rf"{re.escape(blocks)}\.(\d+)\.")
        for key in keys:
            m = inside.match(key)
            if m is None or int(m[1]) >= n_blocks:
                raise QtoolError(f"{path}: entry {key!r} belongs to none of this model's {n_blocks} blocks "
                                 f"({blocks}.0 to {blocks}.{n_blocks - 1}); the search was made for another model, "
                                 "search again")
    if SEARCH_HEADER not in meta:
        log.warning("%s does not say which model and settings its search was made for (an older qtool wrote it); "
                    "only the shapes of its entries can be checked", path)
        return False
    want = _settings(cfg, model_type, n_blocks)
    try:
        made_for = json.loads(meta[SEARCH_HEADER])
    except ValueError:
        made_for = None
    made_on = made_for.pop("weights", None) if isinstance(made_for, dict) else None
    skipped = made_for.pop("skip", []) if isinstance(made_for, dict) else []
    # exact keys and types: 4.0 is not 4 bits, 0 is not False
    if not isinstance(made_for, dict) or set(made_for) != set(want) or \
            any(type(made_for[k]) is not type(v) for k, v in want.items()):
        raise QtoolError(f"{path}: its {SEARCH_HEADER} header is damaged (it should say the model type, block count, "
                         "bits, group size and zero-point setting the search was made for); search again")
    if made_for != want:
        raise QtoolError(f"{path}: the search was made for {_made_for(made_for)}, but this run is {_made_for(want)}; "
                         "replay it with the settings it was made for, or search again")
    if not isinstance(skipped, list) or not all(isinstance(n, str) for n in skipped):
        raise QtoolError(f"{path}: its {SEARCH_HEADER} header is damaged (its skip entry should list module names); "
                         "search again")
    if skipped and _skipped_linears(skipped, linears) != _skipped_linears(cfg.skip, linears):
        said = lambda names: " ".join(dict.fromkeys(f"--skip {spell(n)}" for n in sorted(names)))  # noqa: E731
        raise QtoolError(f"{path}: the search was made with {said(skipped)}, so it holds no "
                         f"scales for those linears, but this run has {said(cfg.skip) or 'no --skip'}; replay it with "
                         "the same --skip, or search again")
    if made_on is not None and probe is not None:
        _check_probe(path, made_on, probe)
    return True


def _skipped_linears(skip, linears: list[str] | None) -> set[str]:
    """The linears ``skip`` names (:func:`quant.layers.skip_matches`), or its entries as written without names."""
    if linears is None:
        return set(skip)
    from quant.layers import skip_matches

    return {n for n in linears if any(skip_matches(n, s) for s in skip)}


def _check_probe(path: Path, made_on, probe: dict) -> None:
    ok = isinstance(made_on, dict) and isinstance(made_on.get("values"), list) and \
        len(made_on["values"]) == _PROBE_VALUES and all(isinstance(v, float) and math.isfinite(v)
                                                         for v in made_on["values"])
    if not ok:
        raise QtoolError(f"{path}: its {SEARCH_HEADER} header is damaged (its weights entry should hold "
                         f"{_PROBE_VALUES} values of the model the search was made on); search again")
    if made_on.get("tensor") != probe["tensor"]:
        raise QtoolError(f"{path}: the search was made on a model whose first weight matrix is "
                         f"{made_on.get('tensor')}, but this model's is {probe['tensor']}; replay it on the model it "
                         "was made for, or search again")
    was, now = torch.tensor(made_on["values"]), torch.tensor(probe["values"])
    far = _far(was, now).flatten()
    if len(far):
        i = int(far[0])
        raise QtoolError(f"{path}: the search was made on other weights than this model's ({probe['tensor']} holds "
                         f"{now[i].item():.6g} where the searched model's held {was[i].item():.6g}); replay it on the "
                         "model it was made for, or search again")


@functools.lru_cache(maxsize=8)
def _log_once_empty(path: str) -> None:
    refused = Path(path).with_name(Path(REFUSED_SEARCH_FILE).name)
    log.warning("%s holds no AWQ search results: the run that saved it kept no AWQ scales (round-to-nearest in every "
                "block, or plain GPTQ beside AWQ+GPTQ), so the replay gives the round-to-nearest checkpoint%s", path,
                f"; the search that run did not keep is {refused}, which --apply-search also takes"
                if refused.is_file() else "")


def kept_module(artifacts: dict[str, torch.Tensor], module: str | None, blocks: str) -> dict[str, torch.Tensor]:
    """The entries of a search (``artifacts``: ``<blocks>.<i>.<linear>.awq_scale`` and the rest) for one module of
    each block (:func:`quant.arch.module_of`), with each block's weight probe: what replays the whole-model check's
    candidate with the method's linears in ``module`` and RTN's elsewhere. ``module`` None (the check kept all-RTN
    or plain GPTQ): no entries."""
    if module is None:
        return {}

    def kept(key: str) -> bool:
        within = key[len(blocks) + 1:].partition(".")[2]  # past "<blocks>.<i>."
        return within == PROBE_KEY or module_of(within) == module

    return {k: v for k, v in artifacts.items() if kept(k)}
