"""The per-block loop of a quantization run: each decoder block loaded, quantized, packed, written and released in
turn, with the progress record a stopped run resumes from (:mod:`quant.resume`), then the whole-model check among the
candidates carried along (:mod:`quant.model_check`). :func:`quant.pipeline.quantize` sets up the run around it."""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from calib.gradients import LossGradientFiles
from calib.runner import BlockInputs, run_sequential
from quant import resume
from quant.checkpoint import checkpoint_tensors
from quant.errors import QtoolError
from quant.guard import FALLBACK_KEY, rtn_guard
from quant.model_check import PARTIAL, Alternatives, check_model, modules_of, partial_module
from quant.layers import to_quant_linears
from quant.methods import BlockContext, BlockResult, get_method
from quant.shards import ShardWriter
from quant.source import SourceModel

log = logging.getLogger(__name__)

SKIPPED = "skipped (full precision)"  # the summary's "kept" for a block --skip leaves whole
LOSS_GRADIENTS = "loss-gradients"  # in the run's folder while it runs: AWQ's loss judge reads them block by block
# The progress record is saved after a block when this many seconds have passed since the last one, and after the
# last block: a stopped run redoes at most about this much work, and a small model's blocks (a few seconds each) do
# not each write the activations of every window (~190 MB a block for the example model, 2% of its run).
# QTOOL_PROGRESS_EVERY_S=0 records every block (benchmarks/resume_kills.py kills runs after given blocks).
PROGRESS_EVERY_S = float(os.environ.get("QTOOL_PROGRESS_EVERY_S", "60"))


@dataclass
class BlockRow:
    """One block's row of the run's summary (``qtool.json``'s report): its linears, seconds, what the method and the
    guards reported (``info``), and whether RTN was kept for it."""

    index: int
    n_linears: int
    seconds: float
    info: dict = field(default_factory=dict)
    rtn_fallback: bool = False  # the checkpoint holds this block's RTN version (its guard's or the whole-model check's)


class Run:
    """Where the output goes and what a stopped run left: the parts, the progress record (:mod:`quant.resume`)."""

    def __init__(self, folder: Path, key: dict, writer: ShardWriter, saved):
        self.folder, self.key, self.writer = folder, key, writer
        self.record, self.tensors = saved if saved is not None else ({}, {})
        self.start = self.finished = self.record.get("blocks_done", 0)
        self.saved_at = time.monotonic()

    def due(self, blocks_done: int, n_blocks: int) -> bool:
        """Whether the progress record is saved after ``blocks_done`` blocks (:data:`PROGRESS_EVERY_S`)."""
        return blocks_done == n_blocks or time.monotonic() - self.saved_at >= PROGRESS_EVERY_S

    def saved_list(self, prefix: str) -> list[torch.Tensor] | None:
        items = sorted((int(k[len(prefix):]), v) for k, v in self.tensors.items() if k.startswith(prefix))
        return [v for _, v in items] or None

    def save(self, blocks_done: int, record: dict, tensors: dict[str, torch.Tensor]) -> None:
        resume.save(self.folder, self.key, blocks_done, record, tensors)
        self.finished, self.saved_at = blocks_done, time.monotonic()


def quantize_blocks(src: SourceModel, arch, cfg, plan, calib_ids, kinds, dev, progress, run: Run, dtype):
    """Each block in turn: loaded from the source, quantized, packed, written as a part, released, and the
    progress record saved; blocks a stopped run finished are skipped (:class:`BlockLoop`).

    Returns the summary rows, AWQ's search results (the method's own model's, kept or not), the whole-model check
    and the names of the parts that make the checkpoint's blocks (each block's own, or the kept candidate's version).
    ``kinds``: the kinds of text whose check windows end ``calib_ids`` (:func:`quant.pipeline._calibration_ids`)."""
    loop = BlockLoop(src, arch, cfg, plan, calib_ids, kinds, run, dtype)
    loop.run_blocks(dev, progress)
    parts = [part_name(i) for i in range(len(src.blocks))]
    model_check = _check_whole_model(src, cfg, calib_ids, loop.held_out, kinds, loop.alts, loop.rows, parts, run)
    return loop.rows, loop.artifacts, model_check, parts


class BlockLoop:
    """The state one pass over the blocks carries from block to block: the summary rows, AWQ's artifacts, each
    block's packed linears until its part is written, the alternatives of the whole-model check. Its three steps
    are what :func:`calib.runner.run_sequential` calls per block: :meth:`load`, :meth:`process` (the method on the
    block and its inputs) and :meth:`done` (once the next block's inputs are computed)."""

    def __init__(self, src: SourceModel, arch, cfg, plan, calib_ids, kinds: list[str], run: Run, dtype):
        self.src, self.arch, self.cfg, self.plan, self.calib_ids, self.kinds = src, arch, cfg, plan, calib_ids, kinds
        self.run, self.dtype = run, dtype
        method = get_method(cfg.method)
        self.method = method if cfg.method == "rtn" else rtn_guard(method)
        self.rows = [BlockRow(**r) for r in run.record.get("rows", [])]
        self.artifacts = {k[len("artifact."):]: v for k, v in run.tensors.items() if k.startswith("artifact.")}
        self.packed: list[dict] = [{} for _ in src.blocks]  # per block: linear name -> PackedWeight, packed once done
        self.alts = Alternatives(run.record, run.saved_list, len(src.blocks))
        self.modules = tuple(modules_of(n for names in plan.quantize for n in names))  # the same in every block
        self.held_out = (*cfg.held_out_split, len(kinds) * cfg.check_windows)
        self.loss_grads: LossGradientFiles | None = None
        self.bar = None
        self.blocks_done = run.start  # written by this process, recorded or not (run.finished: recorded)

    def stored(self, block, prefix: str) -> dict:
        """Block ``block``'s tensors as the checkpoint stores them: the source's names and fused layout, unpacked
        floats in the output dtype (an overflow said in the source's names)."""
        tensors = checkpoint_tensors(block, self.dtype, prefix, spell=self.src.stored_name, why=self.cfg.dtype_option)
        return self.src.to_stored(tensors, self.cfg.format, self.cfg.bits, self.cfg.group_size)

    def load(self, i: int) -> None:
        if i == self.run.start and self.calib_ids is not None:  # the windows are embedded (run_sequential recorded them)
            self.src.release_outside()
        self.src.load_block(i)
        self.plan.check_loaded_block(i, self.src.blocks[i], f"{self.arch.blocks}.{i}.", self.cfg)
        keep_fused_together(self.plan, self.src, self.arch, i)

    def process(self, i: int, block, inputs: BlockInputs | None) -> None:
        t = time.perf_counter()
        if inputs is not None and not all(bool(torch.isfinite(c.hidden).all()) for c in inputs.calls
                                          if c.hidden is not None):
            # statistics of NaN say nothing: every method would fall back to RTN, block by block, in silence
            raise QtoolError(f"the calibration activations at decoder block {i}'s input hold NaN or inf: the model's "
                             "arithmetic overflows on the calibration text; qtool ppl on the full-precision model "
                             "names the first module, and qtool rtn needs no activations")
        if self.loss_grads is not None and inputs is not None:  # AWQ judges by the loss: the gradients at this block's output
            inputs.loss = self.loss_grads.for_block(i)
        blocks = self.src.blocks
        result: BlockResult = self.method(BlockContext(i, block, self.plan.quantize[i], self.cfg, self.arch, inputs,
                                                       self.modules))
        if result.block is not None:
            blocks[i] = result.block
        if not self.plan.quantize[i]:  # --skip of the whole block: no method's, RTN's or candidate's block but its own
            result.info[FALLBACK_KEY] = SKIPPED
        self.packed[i] = {n: pw.to("cpu") for n, pw in result.packed.items()}
        self.alts.advance(i, result.alternatives, inputs, blocks[i])
        self.artifacts.update({f"{self.arch.blocks}.{i}.{k}": v.detach().cpu() for k, v in result.artifacts.items()})
        self.rows.append(BlockRow(i, len(self.plan.quantize[i]), time.perf_counter() - t, result.info,
                                  result.block is not None))
        if self.bar is not None:
            self.bar.update(1)

    def done(self, i: int, hidden=None) -> None:
        """The next block's inputs are computed (with the dense quantized weights): pack, write, release,
        then record the progress (after the parts are on disk)."""
        blocks, writer, prefix = self.src.blocks, self.run.writer, f"{self.arch.blocks}.{i}."
        to_quant_linears(blocks[i], self.packed[i], self.cfg.format)
        writer.write(part_name(i), self.stored(blocks[i], prefix))
        # Each alternative's version, in case the whole-model check keeps it: one part per distinct block (a
        # candidate whose block is the method's, or another candidate's, names that part).
        # The one-module candidates last: one's block may be its base model's, never the other way around.
        holder = {id(blocks[i]): "block"}
        for name, alt_block in sorted(self.alts.pending.items(), key=lambda item: PARTIAL in item[0]):
            part = holder.setdefault(id(alt_block), name)
            if part == name:
                alt_block.to("cpu")
                writer.write(part_name(i, name), self.stored(alt_block, prefix))
            self.alts.parts[name][i] = part
        self.alts.pending.clear()
        self.packed[i] = {}
        self.src.release(i)
        self.blocks_done = i + 1
        if self.run.due(i + 1, len(blocks)):
            self.save_progress(i + 1, hidden)

    def save_progress(self, blocks_done: int, hidden) -> None:
        """The progress record after ``blocks_done`` blocks (:mod:`quant.resume`): the rows, AWQ's artifacts, the
        calibration windows, the alternatives and the next block's inputs (``hidden``, where given)."""
        state = {f"artifact.{k}": v for k, v in self.artifacts.items()}
        if self.calib_ids is not None:
            state[resume.CALIB_IDS] = self.calib_ids
        state.update(self.alts.state())
        for s_i, part in enumerate(hidden or []):
            state.update({f"hidden.{s_i}.{j}": h.cpu() for j, h in enumerate(part)})
        record = {"rows": [asdict(r) for r in self.rows], "alternatives": self.alts.parts,
                  "alternative_streams": self.alts.shares(), "kinds": self.kinds,
                  "plan": {"quantize": self.plan.quantize, "skipped": self.plan.skipped}}
        self.run.save(blocks_done, record, state)

    def run_blocks(self, dev: torch.device, progress: bool) -> None:
        """Every block from the first one a stopped run did not finish; without calibration windows (RTN) each block
        alone, else through :func:`calib.runner.run_sequential`. Ctrl-C says what is kept and raises again."""
        src, cfg, run, blocks = self.src, self.cfg, self.run, self.src.blocks
        self.bar = tqdm(total=len(blocks), initial=run.start, desc=f"{cfg.method} w{cfg.bits}", unit="block",
                        disable=not progress)
        compute_dtype = torch.float32 if dev.type == "cpu" else src.dtype
        try:
            if LossGradientFiles.wanted(cfg, self.calib_ids):
                self.loss_grads = LossGradientFiles(src, cfg, self.calib_ids, self.held_out, dev, compute_dtype,
                                                    run.folder / LOSS_GRADIENTS, run.start)
                if not run.record:  # a record before the first block: a stop from here on keeps the pass over the model
                    self.save_progress(0, None)
            if self.calib_ids is None:
                for i in range(run.start, len(blocks)):
                    self.load(i)
                    blocks[i].to(dev)
                    self.process(i, blocks[i], None)
                    blocks[i].to("cpu")
                    self.done(i)
            else:
                start_hidden = None
                if run.start:
                    start_hidden = [run.saved_list(f"hidden.{s_i}.") or [] for s_i in range(4)]
                run_sequential(src.model, blocks, self.calib_ids, self.process, dev, compute_dtype,
                               held_out=self.held_out, on_block_done=self.done, before_block=self.load,
                               start=run.start, start_hidden=start_hidden,
                               lead=cfg.awq.judge_windows if cfg.searches_awq else None)
        except KeyboardInterrupt:
            if run.finished:
                log.warning("stopped: %d of %d blocks are finished and kept in %s; run the same command again to "
                            "continue from there", run.finished, len(blocks), run.folder)
            else:
                when = ("before the first block was finished" if self.blocks_done == 0 else
                        f"after {self.blocks_done} finished blocks, before the first progress record (saved at most "
                        f"every {PROGRESS_EVERY_S:g} s)")
                if self.loss_grads is not None:  # recorded before the first block
                    log.warning("stopped %s; the loss gradients are kept in %s: run the same command again to "
                                "continue from there", when, run.folder)
                else:
                    log.warning("stopped %s; nothing is kept", when)
            raise
        finally:  # an error message then starts on its own line
            self.bar.close()
        if self.loss_grads is not None:  # a stopped run keeps them with its blocks: its resumption reads them
            shutil.rmtree(self.loss_grads.folder, ignore_errors=True)


def _check_whole_model(src: SourceModel, cfg, calib_ids, held_out: tuple, kinds: list[str], alts: Alternatives,
                       rows: list[BlockRow], parts: list[str], run: Run) -> dict | None:
    """The whole-model check (:func:`quant.model_check.check_model`) of the method's model against its complete
    alternatives, where there is a choice to make (not when every block already fell back to RTN and RTN is the
    only alternative); None where it does not run. Where it keeps an alternative, ``parts`` name that
    alternative's version of each block that has one, and ``rows`` say which model each block comes from."""
    candidates = alts.complete()
    # Where the guard kept RTN in every block, all-RTN and the one-module candidates (RTN's blocks there) are the
    # method's model: only another method's model (plain GPTQ beside AWQ+GPTQ) leaves a choice.
    others = [n for n in candidates if n != "rtn" and partial_module(n, cfg.label) is None]
    if not candidates or (not others and all(r.rtn_fallback for r in rows)):
        return None
    src.load_outside()
    n_guard, n_check = held_out[1:]  # the windows as run_sequential batched them
    guard_ids = calib_ids[len(calib_ids) - n_guard - n_check:len(calib_ids) - n_check]
    check_ids = calib_ids[len(calib_ids) - n_check:]
    try:
        model_check = check_model(src.model, src.blocks, guard_ids, check_ids, kinds, alts.final, candidates, cfg)
    except KeyboardInterrupt:
        log.warning("stopped during the whole-model check: all %d blocks are finished and kept in %s; run the "
                    "same command again to redo only the check and write the checkpoint", len(src.blocks), run.folder)
        raise
    kept = model_check["kept"]
    if kept != cfg.label:
        for i, r in enumerate(rows):
            if not r.n_linears:  # skipped whole: full precision in every candidate
                continue
            part = alts.parts[kept][i]  # "block": the method's own block is the kept model's too
            parts[i] = part_name(i, part)
            # Whose block it is: the method's own (RTN's where the block's guard kept RTN), or the candidate's
            # that holds it (the kept one's, or its base model's where the block lacks its module: --skip).
            own_rtn = r.info.get(FALLBACK_KEY) == "rtn"
            source = ("rtn" if own_rtn else cfg.label) if part == "block" else part
            r.rtn_fallback = source == "rtn"
            r.info[FALLBACK_KEY] = ("rtn" if part == "block" and own_rtn
                                    else f"{source} (whole model)" if source == kept
                                    else f"{source} (whole model: {kept})")
    return model_check


def keep_fused_together(plan, src: SourceModel, arch, i: int) -> None:
    """q, k and v that the checkpoint stores fused (InternLM2's wqkv) are quantized all or none."""
    if src.layout is not None and src.layout.fused_qkv:
        plan.keep_together(i, src.layout.qkv, f"{arch.blocks}.{i}.", f"stored as one tensor ({src.layout.fused_qkv})")


def part_name(i: int, kind: str = "block") -> str:
    return f"{kind}-{i:05d}"
