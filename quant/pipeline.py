"""The whole job: model folder -> calibration -> quantized blocks -> packed checkpoint folder."""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from quant import arch as arch_table
from quant import block_loop, folder, heap, model_io, output, resume
from quant.block_loop import BlockRow
from quant.checkpoint import checkpoint_tensors, is_quantized_checkpoint, output_dtype, write_metadata
from quant.config import REFUSED_SEARCH_FILE, SEARCH_FILE, QuantConfig
from quant.errors import QtoolError
from quant.formats.compat import Written, check_target, readers, skip_pattern
from quant.model_check import partial_module
from quant.layers import plan_linears
from quant.shards import MAX_SHARD_BYTES, ShardWriter
from quant.source import SourceModel, source_fingerprint

log = logging.getLogger(__name__)

@dataclass
class QuantReport:
    """What a run did: for the summary table and ``qtool.json``."""

    out: str
    method: str  # as the summary names it: rtn, awq, gptq, gptq+awq (QuantConfig.label)
    fmt: str
    bits: int
    group_size: int
    n_quantized: int
    skipped: dict[str, str]
    seconds: float
    calib_seconds: float
    peak_rss_mb: float
    peak_device_mb: float
    source_bytes: int
    output_bytes: int
    blocks: list[BlockRow]
    guarded: bool | None = None  # whether the RTN guard ran (None: a method it does not apply to)
    # The whole-model check on the guard windows (nats/token): {"method": its label, "nll": the method's model,
    # "alternatives": {name: loss} ("rtn": all-RTN, "gptq": plain GPTQ beside AWQ+GPTQ), "rtn_nll": all-RTN's,
    # "kept": the label or an alternative's name}; None where it did not run.
    model_check: dict | None = None
    resumed_from: int | None = None  # the first block this run quantized, where it continued a stopped one
    # loader -> None where it reads the checkpoint right, else why not (quant.formats.compat.readers)
    loaders: dict[str, str | None] = field(default_factory=dict)


def _calibration_ids(model_dir, cfg: QuantConfig, add_bos: bool) -> tuple[torch.Tensor, list[str]]:
    """The calibration windows ``[n_samples + held_out + n_check, seqlen]``, the held-out ones after the searched
    ones (:mod:`calib.runner`), then the whole-model check's windows of each built-in kind of text the calibration
    lacks, ``cfg.check_windows`` per kind in the order of the returned kinds (none without guard windows)."""
    from calib.data import builtin_text, calibration_batch, check_kinds, load_texts

    tok = model_io.load_tokenizer(model_dir)
    texts = load_texts(cfg.calib_data, text_field=cfg.text_field)
    try:  # the held-out windows come last (calib.runner)
        ids = calibration_batch(tok, texts, cfg.n_samples, cfg.seqlen, cfg.seed, add_bos, sum(cfg.held_out_split))
    except QtoolError as e:  # say which text was too short
        msg = str(e)
        raise QtoolError(f"{cfg.calib_data or 'the built-in calibration corpus'}: {msg[:1].lower()}{msg[1:]}") from None
    kinds = check_kinds(texts) if cfg.check_windows and cfg.held_out_split[1] and cfg.method != "rtn" else []
    checks = [calibration_batch(tok, [builtin_text(kind)], cfg.check_windows, cfg.seqlen, cfg.seed, add_bos)
              for kind in kinds]
    return torch.cat([ids, *checks]), kinds


def quantize(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    cfg: QuantConfig | None = None,
    *,
    overwrite: bool = False,
    device: str | None = "auto",
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    restart: bool = False,
    **options,
) -> QuantReport:
    """Quantize the model in ``model_dir`` and write the packed checkpoint to ``out``.

    Either pass a :class:`QuantConfig` or its fields as keywords
    (``quantize("m/", "m-w4/", method="awq", bits=4, group_size=128)``). The model is
    streamed (:class:`quant.source.SourceModel`): one decoder block is in memory at a
    time, read from the source shards in the source dtype, and written to the output
    (shards of at most ``max_shard_bytes``, with an index file past one) as soon as it is
    quantized. The source folder is only read; ``out`` appears complete or not at all.

    A run stopped by Ctrl-C, kill -9 or a power cut keeps its finished blocks beside ``out``;
    the same call continues at the first unfinished block and gives a checkpoint
    bit-identical to an uninterrupted run's (:mod:`quant.resume`). A stopped run with other
    settings or from a changed source is refused unless ``restart``. Raises
    :class:`QtoolError` (one sentence) for bad input.

    Under glibc this sets the calling process's mmap threshold (:func:`quant.heap.keep_large_allocations_mapped`)
    so that freed activations go back to the system instead of piling up in the heap, and tokenizes the calibration
    text in a forked child process (:func:`quant.heap.in_child`), whose memory leaves with it.
    """
    folder.path_argument(out, "the output folder")  # the model folder's: read_config's
    cfg = QuantConfig.from_options(cfg, **options)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise QtoolError(f"max_shard_bytes {max_shard_bytes!r} must be a positive number of bytes (the command "
                         "line's --max-shard-size takes 500MB, 2GB ...)")
    heap.keep_large_allocations_mapped()
    t0 = time.perf_counter()
    config, arch, cfg, replay = _check_source(model_dir, cfg)
    dev = model_io.parse_device(device)
    settings = _run_settings(cfg, replay)
    key = resume.run_key(settings, dev.type, source_fingerprint(model_dir))
    with output.atomic_output(out, overwrite, source=model_dir, resume_key=key, restart=restart) as tmp:
        saved = resume.load(tmp)
        # Embeddings and lm_head are read only where the run needs them (calibration, the whole-model check).
        src = SourceModel(model_dir, arch.blocks, outside=cfg.needs_calibration)
        settings_known = True  # what the saved search file's header may claim
        # which weights a search is made on (read before any block is quantized in the skeleton)
        probe = _weight_probe(src, arch.blocks) if cfg.folds_scales else None
        if src.layout is not None and cfg.skip:  # --skip in the checkpoint's own names: see _native_skip
            cfg = cfg.with_(skip=_native_skip(cfg.skip, src, arch))
        if replay is not None:  # made for this model and these settings, or refused
            from quant.awq import check_search_file

            # --skip compared by the linears it names (the search recorded them in the native names too)
            linears = _block_linears(src, arch)
            spell = str if src.layout is None else lambda n: src.layout.stored_name(f".{n}.").strip(".")
            settings_known = check_search_file(replay, cfg, config["model_type"], len(src.blocks), probe,
                                               arch.blocks, linears, spell)
        t_cal = time.perf_counter()
        calib_ids, kinds = _calibration(src, model_dir, cfg, arch, saved)
        calib_seconds = time.perf_counter() - t_cal
        plan = plan_linears(src.model, arch, cfg)
        for i in range(len(plan.quantize)):
            block_loop.keep_fused_together(plan, src, arch, i)
        # a remote-code family (InternLM2), written back in its own layout
        family = config["model_type"] if src.layout is not None and src.layout.remote_code else None
        check_target(cfg.target, _written(cfg, arch, *_stored_names(plan, src, arch), family))
        dtype = output_dtype(cfg, src, {f"{arch.blocks}.{i}.{n}.weight" for i, names in enumerate(plan.quantize)
                                        for n in names})
        writer = ShardWriter(tmp, max_shard_bytes)
        run = block_loop.Run(tmp, key, writer, saved)
        if saved is not None:
            _resume_plan(plan, saved, run.start, len(src.blocks), tmp)
        rows, artifacts, model_check, parts = block_loop.quantize_blocks(src, arch, cfg, plan, calib_ids, kinds, dev,
                                                                         progress, run, dtype)
        # Layers kept while the blocks were quantized (scales past float16) count too: checked again, then written.
        kept, quantized = _stored_names(plan, src, arch)
        written = _written(cfg, arch, kept, quantized, family)
        check_target(cfg.target, written)
        writer.finish(parts + _write_outside(src, writer, arch, dtype, cfg.dtype_option))
        report = QuantReport(
            out=str(Path(out).absolute()), method=cfg.label, fmt=cfg.layout, bits=cfg.bits,
            # counted and named as the checkpoint stores them (InternLM2's q, k and v are one wqkv)
            group_size=cfg.group_size, n_quantized=len(quantized),
            skipped={src.stored_module(n): why for n, why in plan.skipped.items()},
            seconds=time.perf_counter() - t0, calib_seconds=calib_seconds, peak_rss_mb=heap.peak_rss_mb(),
            peak_device_mb=torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else 0.0,
            source_bytes=folder.folder_bytes(model_dir), output_bytes=folder.folder_bytes(tmp, ("model*.safetensors",)), blocks=rows,
            guarded=cfg.held_out_split[1] > 0 if cfg.needs_calibration else None, model_check=model_check,
            resumed_from=run.start if saved is not None else None,
            loaders=readers(written),
        )
        recorded = cfg.recorded()  # what the run used: the calibration file resolved, the search file read (above)
        if recorded.get("calib_data"):
            recorded["calib_data"] = settings["calib_data"]
        meta = {"qtool": {"config": recorded, "report": asdict(report)}}
        write_metadata(cfg, model_dir, tmp, kept, quantized, meta, dtype)
        if cfg.folds_scales:  # even empty (every block kept at RTN): a replay then gives RTN everywhere
            from quant.awq.search_file import search_metadata

            # A replay of a file that did not say its settings does not vouch for them either.
            header = search_metadata(cfg, config["model_type"], len(src.blocks), probe) if settings_known else None
            _save_search(tmp, cfg, artifacts, model_check, arch.blocks, header)
        writer.cleanup()
    return report


def _check_source(model_dir, cfg: QuantConfig) -> tuple[dict, arch_table.Arch, QuantConfig, Path | None]:
    """The source's ``config.json`` (refused where it is no causal LM or is already quantized), its row of the
    architecture table, ``cfg`` and, for a replay, the search file (a folder names the one inside it), resolved
    and checked readable: each mistake one sentence (:class:`QtoolError`) before any work."""
    config = model_io.check_causal_lm(model_dir)
    if is_quantized_checkpoint(model_dir):
        method = (config.get("quantization_config") or {}).get("quant_method", "an older tool's")
        raise QtoolError(f"{model_dir}: is already quantized ({method} quantization); quantize the original "
                         "full-precision model instead")
    arch = arch_table.lookup(arch_table.row_key(config), f"{Path(model_dir) / 'config.json'}")
    if not cfg.needs_calibration and folder.has_tokenizer_files(model_dir):
        # RTN reads no text, but copies the tokenizer into the checkpoint: a damaged one would be served from there
        heap.in_child(_check_tokenizer, model_dir, what="reading the tokenizer")
    replay = None
    if cfg.method == "awq" and cfg.awq.search_file:
        from quant.awq.search_file import check_readable, search_path

        replay = search_path(cfg.awq.search_file).resolve()
        check_readable(replay)  # before --restart removes a stopped run: a damaged file must not cost it
        cfg = cfg.with_(awq=replace(cfg.awq, search_file=str(replay)))
    return config, arch, cfg, replay


def _check_tokenizer(model_dir) -> None:
    model_io.load_tokenizer(model_dir)


def _run_settings(cfg: QuantConfig, replay: Path | None) -> dict:
    """``cfg`` as the key of a resumable run (:func:`quant.resume.run_key`) sees it: the calibration file by its
    resolved path (the file, not the path as typed); a replay's search file by its content's digest, not where
    it lies."""
    settings = cfg.settings()
    if settings["calib_data"] and Path(settings["calib_data"]).exists():
        settings["calib_data"] = str(Path(settings["calib_data"]).resolve())
    if replay is not None:  # a replay reads the file block by block
        settings["awq"]["search_digest"] = resume.file_digest(replay)
        settings["awq"]["search_file"] = None
    return settings


def _calibration(src: SourceModel, model_dir, cfg: QuantConfig, arch, saved) -> tuple[torch.Tensor | None, list[str]]:
    """The calibration windows and the check's kinds of text (:func:`_calibration_ids`): those a stopped run
    saved (the windows its finished blocks saw), else tokenized in a child process, whose tokenizer memory never
    enters this one (:func:`quant.heap.in_child`); ``(None, [])`` for a method without calibration."""
    if not cfg.needs_calibration:
        return None, []
    model_io.check_seqlen(src.model, cfg.seqlen)
    if saved is not None and resume.CALIB_IDS in saved[1]:
        return saved[1][resume.CALIB_IDS], saved[0]["kinds"]
    return heap.in_child(_calibration_ids, model_dir, cfg, arch.needs_bos, what="tokenizing the calibration text")


def _resume_plan(plan, saved, start: int, n_blocks: int, tmp: Path) -> None:
    """Continue a stopped run: say where, and take its plan (which linears it quantizes and which it kept)."""
    if start == 0:
        log.warning("resuming a run stopped before its first block was finished (%s): its calibration windows and "
                    "AWQ's loss gradients are read, not computed again", tmp)
    elif start < n_blocks:
        log.warning("resuming at block %d of %d: the blocks before it were finished by a stopped run (%s)",
                    start, n_blocks, tmp)
    else:
        log.warning("resuming: all %d blocks were finished by a stopped run (%s); writing the rest", n_blocks, tmp)
    plan.quantize, plan.skipped = saved[0]["plan"]["quantize"], saved[0]["plan"]["skipped"]


def _write_outside(src: SourceModel, writer: ShardWriter, arch, dtype: torch.dtype, why: str | None) -> list[str]:
    """The tensors outside the decoder blocks (embeddings, final norm, lm_head), one part each so that one
    tensor is in memory at a time, converted to ``dtype`` as read (never whole in the source dtype; an overflow
    said after ``why``, what chose it); returns the parts' names."""
    parts = []
    for j, name in enumerate(src.outside):
        src.load_tensor(name, dtype, why)
        parts.append(f"outside-{j:05d}")
        writer.write(parts[-1], src.to_stored(checkpoint_tensors(src.model, dtype, exclude=arch.blocks, only={name},
                                                                 spell=src.stored_name, why=why)))
        src.release_tensor(name)
    return parts


def _save_search(tmp: Path, cfg: QuantConfig, artifacts: dict, model_check: dict | None, blocks: str,
                 header: dict | None) -> None:
    """The search's scales and clips (``SEARCH_FILE``), as the kept model used them: all of them where the check
    kept the method's own model, else only those of the module it kept AWQ in (none for all-RTN); the whole search
    then goes to ``REFUSED_SEARCH_FILE``, replayable for a look or another check."""
    from quant.awq.search_file import kept_module

    own_kept = model_check is None or model_check["kept"] == cfg.label
    kept = artifacts if own_kept else kept_module(artifacts, partial_module(model_check["kept"], cfg.label), blocks)
    (tmp / SEARCH_FILE).parent.mkdir(exist_ok=True)
    output.save_safetensors(kept, tmp / SEARCH_FILE, header)
    if not own_kept and artifacts:
        output.save_safetensors(artifacts, tmp / REFUSED_SEARCH_FILE, header)


def _weight_probe(src: SourceModel, blocks: str) -> dict:
    """The first block's first weight matrix, read from the source, as :func:`quant.awq.weight_probe` takes it."""
    from quant.awq import first_weight, weight_probe

    name = f"{blocks}.0.{first_weight(src.blocks[0])}"
    return weight_probe(name, src.tensor(name))


def _block_linears(src: SourceModel, arch) -> list[str]:
    """The full names of the linears inside the decoder blocks of ``src``'s skeleton (native names)."""
    return [n for n, m in src.model.get_submodule(arch.blocks).named_modules(prefix=arch.blocks)
            if isinstance(m, torch.nn.Linear)]


def _native_skip(skip: tuple[str, ...], src: SourceModel, arch) -> tuple[str, ...]:
    """``--skip`` entries in the checkpoint's own names (InternLM2's ``feed_forward.w2``, the fused ``attention.wqkv``,
    a module holding them such as ``attention`` or ``model.layers.0.attention``) as the native linears they name:
    inside a block where the entry names no block, else whole names. An entry that names no stored module is kept
    as given (a native name such as ``self_attn.q_proj``; a typo is refused with the closest names)."""
    from quant.layers import skip_matches

    linears = _block_linears(src, arch)
    native = []
    for entry in skip:
        hits = [n for n in linears if skip_matches(src.stored_module(n), entry)]
        if hits and not re.search(r"(^|\.)\d+(\.|$)", entry):  # the same linears in every block
            hits = [n.removeprefix(f"{arch.blocks}.").split(".", 1)[1] for n in hits]
        native += hits or [entry]
    return tuple(dict.fromkeys(native))


def _written(cfg: QuantConfig, arch, kept: list[str], quantized: list[str], family: str | None) -> Written:
    """The checkpoint as the loaders will see it (:mod:`quant.formats.compat`); ``family``: the model_type of a
    source in its family's own layout, written back in it."""
    return Written(cfg.layout, cfg.bits, cfg.sym, cfg.act_order, cfg.group_size, skip_pattern(kept, quantized), arch.moe,
                   family=family)


def _stored_names(plan, src: SourceModel, arch) -> tuple[list[str], list[str]]:
    """The linears kept in full precision and those quantized, by their stored module names (sorted)."""
    kept = sorted({src.stored_module(n) for n in plan.skipped})
    quantized = sorted({src.stored_module(f"{arch.blocks}.{i}.{n}") for i, names in enumerate(plan.quantize)
                        for n in names} - set(kept))
    return kept, quantized
