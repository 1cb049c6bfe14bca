"""Self-calibration: calibration text sampled from the model that will be quantized.

Williams, Chrysostomou and Aletras, "Self-calibration for Language Model Quantization and
Pruning" (NAACL 2025): instead of web text, the calibration windows are sequences the
full-precision model writes itself from its start token, which follow the distribution it
was trained on, without a second text. A calibration text of one kind (Wikipedia) fits
the Hessians and AWQ's judge to that kind; on Qwen2.5-Coder-0.5B, GPTQ calibrated on
Wikipedia closed 58% of the RTN gap on Wikipedia and 3% on Python code, and with 40% of
the windows the model's own samples, 63% and 12% (benchmarks/RESULTS.md, issue 20).

Sampling (the settings of the second try in RESULTS.md): of the 50 most likely tokens, the
nucleus of mass 0.95 (top-k, then top-p; without top-k a hot start over the whole vocabulary
draws noise that the model then continues), a temperature that falls linearly from
``t_start`` at the first new token to ``t_end`` at the last (high early for diverse
openings, low late for coherent continuations), a repetition penalty, and every sequence
forced to ``new_tokens`` tokens.
A sequence whose text zlib compresses below ``min_zlib_ratio`` of its size is a
repetition loop (a small model sampled freely falls into them: "here_here_here") and is
drawn again. Batch ``b`` is drawn from its own generator seeded by ``(seed, b)``, so a run
stopped after some batches and resumed writes the same text as one that never stopped.

The result is a ``.txt`` calibration file (one sequence per document, separated by a
blank line; blank lines inside a sequence are dropped) for ``--calib-data``, alone or
joined to another text file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quant.errors import QtoolError

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial.jsonl"  # finished batches of a stopped run, beside the output file
_MAX_REDRAWS = 2  # a run gives up after redrawing more than this many times n_sequences
MAX_BATCH = 4096


@dataclass(frozen=True)
class SamplingOptions:
    """How the model's own sequences are drawn (module docstring).

    ``n_sequences`` sequences of exactly ``new_tokens`` new tokens each; the default 144 is
    the default calibration's 128 windows plus its 16 held-out ones, so the file alone
    feeds a default run at ``--seqlen 512`` without reusing a token.
    """

    n_sequences: int = 144
    new_tokens: int = 512
    t_start: float = 1.5
    t_end: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    min_zlib_ratio: float = 0.2
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        checks = (
            (self.n_sequences >= 1, f"--n-sequences {self.n_sequences}: give a whole number of sequences, 1 or more"),
            (self.new_tokens >= 16, f"--tokens {self.new_tokens}: give at least 16 new tokens per sequence"),
            (0.0 < self.t_end <= self.t_start <= 10.0,
             f"temperatures {self.t_start} -> {self.t_end}: they must satisfy 0 < end <= start <= 10"),
            (self.top_k >= 1, f"--top-k {self.top_k}: give a whole number of tokens, 1 or more"),
            (0.0 < self.top_p <= 1.0, f"--top-p {self.top_p}: give a fraction in (0, 1]"),
            (1.0 <= self.repetition_penalty <= 2.0,
             f"--repetition-penalty {self.repetition_penalty}: give a value from 1 (none) to 2"),
            (0.0 <= self.min_zlib_ratio < 1.0, f"--min-zlib-ratio {self.min_zlib_ratio}: give a fraction in [0, 1)"),
            (1 <= self.batch_size <= MAX_BATCH, f"--batch-size {self.batch_size}: give a whole number from 1 to "
                                                f"{MAX_BATCH}"),
            (0 <= self.seed < 2**31, f"--seed {self.seed}: give a whole number from 0 to {2**31 - 1}"),
        )
        for ok, msg in checks:
            if not ok:
                raise QtoolError(msg)


def temperature_at(step: int, opts: SamplingOptions) -> float:
    """The temperature of new token ``step`` (0-based): linear from ``t_start`` to ``t_end``."""
    frac = min(step / max(opts.new_tokens - 1, 1), 1.0)
    return opts.t_start + (opts.t_end - opts.t_start) * frac


def zlib_ratio(text: str) -> float:
    """Compressed size over raw size of the UTF-8 text: near 0 for a loop, about 0.3-0.5 for prose and code."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw)) / max(len(raw), 1)


def _clean(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.strip())


def start_token(tokenizer, config) -> int:
    """The token every sequence starts from: BOS where the model has one, else end-of-text (Qwen2)."""
    for tid in (tokenizer.bos_token_id, getattr(config, "bos_token_id", None), tokenizer.eos_token_id,
                getattr(config, "eos_token_id", None)):
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    raise QtoolError("the tokenizer and config.json name neither a BOS nor an end-of-text token to start sampling from")


class _FallingTemperature:
    """A transformers logits processor: divides the scores of new token ``step`` by :func:`temperature_at`."""

    def __init__(self, prompt_len: int, opts: SamplingOptions):
        self.prompt_len, self.opts = prompt_len, opts

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / temperature_at(input_ids.shape[1] - self.prompt_len, self.opts)


def _sample_batch(model, n: int, start: int, opts: SamplingOptions, seed: int) -> torch.Tensor:
    """``[n, new_tokens]`` int64 token ids from transformers' ``generate``, its draws seeded by ``seed`` alone."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids = torch.full((n, 1), start, dtype=torch.long, device=device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=opts.top_k, top_p=opts.top_p, repetition_penalty=opts.repetition_penalty,
                             logits_processor=LogitsProcessorList([_FallingTemperature(1, opts)]),
                             max_new_tokens=opts.new_tokens, min_new_tokens=opts.new_tokens, pad_token_id=start)
    return out[:, 1:].cpu()


def settings_key(model_dir: str | os.PathLike, opts: SamplingOptions, dtype: str, device: str) -> str:
    """What a stopped run's finished batches depend on: the model folder (its path, its
    :func:`quant.source.source_fingerprint`, and the bytes of its other JSON and tokenizer files), the compute
    dtype and device, and the options other than ``n_sequences``."""
    from quant.source import source_fingerprint

    src = Path(model_dir).resolve()
    side = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.suffix == ".json" or f.name.startswith("tokenizer")) and f.name != "config.json":
            side.update(f.name.encode() + b"\0" + f.read_bytes())
    blob = json.dumps({"model": str(src), "source": source_fingerprint(src), "side": side.hexdigest(), "dtype": dtype,
                       "device": device, "opts": {k: v for k, v in asdict(opts).items() if k != "n_sequences"}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class SamplingReport:
    """What a run drew: sequences kept and redrawn, tokens, seconds, the zlib ratios of the kept text."""

    kept: int
    redrawn: int
    tokens: int
    seconds: float
    resumed_batches: int
    median_zlib_ratio: float
    min_zlib_ratio: float
    out: str


def generate_self_samples(model, tokenizer, opts: SamplingOptions, *, done: list[dict] | None = None,
                          on_batch=None) -> tuple[list[str], int]:
    """Sample ``opts.n_sequences`` sequences from ``model`` (module docstring).

    ``done``: batches already finished (``{"batch": b, "texts": [...], "redrawn": r}``), not drawn again;
    ``on_batch(record)`` is called with each new batch's record. Returns the kept texts and the number
    redrawn. Raises ``QtoolError`` when more than twice ``n_sequences`` sequences had to be redrawn
    (the model keeps falling into loops: lower ``min_zlib_ratio`` or raise the repetition penalty).
    """
    start = start_token(tokenizer, model.config)
    texts, redrawn, b = [], 0, 0
    records = {r["batch"]: r for r in (done or [])}
    while len(texts) < opts.n_sequences:
        if redrawn > _MAX_REDRAWS * opts.n_sequences:
            raise QtoolError(f"{redrawn} sampled sequences were repetition loops (zlib ratio under "
                             f"{opts.min_zlib_ratio}) against {len(texts)} kept; lower --min-zlib-ratio or raise "
                             "--repetition-penalty")
        rec = records.get(b)
        if rec is None:
            n = min(opts.batch_size, opts.n_sequences - len(texts))  # the last batch: only what is still wanted
            ids = _sample_batch(model, n, start, opts, seed=opts.seed * 1_000_003 + b)
            kept, rej = [], 0
            for row in ids:
                text = _clean(tokenizer.decode(row.tolist(), skip_special_tokens=True))
                if text and zlib_ratio(text) >= opts.min_zlib_ratio:
                    kept.append(text)
                else:
                    rej += 1
            rec = {"batch": b, "texts": kept, "redrawn": rej}
            if on_batch is not None:
                on_batch(rec)
        texts.extend(rec["texts"])
        redrawn += rec["redrawn"]
        b += 1
    return texts[: opts.n_sequences], redrawn


def write_self_samples(model_dir: str | os.PathLike, out: str | os.PathLike, opts: SamplingOptions = SamplingOptions(),
                       *, dtype: str = "auto", device: str = "auto", overwrite: bool = False,
                       progress: bool = False) -> SamplingReport:
    """Sample the full-precision model in ``model_dir`` and write the ``.txt`` calibration file ``out``.

    The whole model is loaded on ``device`` (``auto``: a GPU if one is visible; ``dtype`` auto: float32 on
    the CPU, the checkpoint's dtype on a GPU). Finished batches are kept in ``out`` + ``.partial.jsonl``
    (locked while a run writes it) as the run goes on: a stopped run given the same command, on the same
    model, dtype and device, resumes from them; ``out`` itself appears only once complete (written to a
    temporary file, then renamed). Raises ``QtoolError`` for a missing or quantized model, more tokens than
    the model has positions for, an output inside the model folder, an existing output without
    ``overwrite``, an output that is not a ``.txt`` path or cannot be written, or another run writing the
    same output.
    """
    import quant
    from quant.checkpoint import is_quantized_checkpoint
    from quant.model_io import check_causal_lm, load_tokenizer, parse_device

    src, dst = Path(model_dir), Path(out)
    config = check_causal_lm(src)
    if is_quantized_checkpoint(src):
        raise QtoolError(f"{model_dir}: is a quantized checkpoint; self-calibration samples the full-precision "
                         "model that will be quantized: give its folder")
    _check_output(src, out, overwrite)
    max_pos = (config.get("text_config") or config).get("max_position_embeddings")
    if max_pos and opts.new_tokens + 1 > max_pos:
        raise QtoolError(f"--tokens {opts.new_tokens}: {model_dir} has max_position_embeddings {max_pos} (the start "
                         f"token takes one); give --tokens {max_pos - 1} or less")
    load_tokenizer(src)  # a folder without a usable tokenizer is refused before the record of batches is made
    dev = parse_device(device)
    opts = replace(opts, batch_size=min(opts.batch_size, opts.n_sequences))  # no batch larger than the run needs
    key = settings_key(src, opts, str(dtype), str(dev))
    partial = dst.with_name(dst.name + PARTIAL_SUFFIX)
    with _PartialFile(partial, key) as record:
        t0 = time.time()
        model, tokenizer = quant.load_any(src, dtype=dtype, device=dev)
        done = record.done
        bar = tqdm(total=opts.n_sequences, initial=min(sum(len(r["texts"]) for r in done), opts.n_sequences),
                   desc="self-calibration", unit="seq", disable=not progress)
        redrawn_total = sum(r["redrawn"] for r in done)

        def keep(rec):
            nonlocal redrawn_total
            record.append(rec)
            bar.update(min(len(rec["texts"]), bar.total - bar.n))
            redrawn_total += rec["redrawn"]
            bar.set_postfix(redrawn=redrawn_total)

        try:
            texts, redrawn = generate_self_samples(model, tokenizer, opts, done=done, on_batch=keep)
        finally:
            bar.close()
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
            os.replace(tmp, dst)
        except OSError as e:
            raise QtoolError(f"{out}: cannot be written ({e.strerror or e}); the sampled batches are kept in "
                             f"{partial.name}: free the space or fix the folder and rerun the same command") from None
        finally:
            tmp.unlink(missing_ok=True)
        record.finished = True
    ratios = [zlib_ratio(t) for t in texts]
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return SamplingReport(kept=len(texts), redrawn=redrawn, tokens=tokens, seconds=time.time() - t0,
                          resumed_batches=len(done), median_zlib_ratio=statistics.median(ratios),
                          min_zlib_ratio=min(ratios), out=str(dst))


def _check_output(src: Path, out: str | os.PathLike, overwrite: bool) -> None:
    if str(out).endswith(("/", os.sep)):  # Path() would drop the slash and write a file of that name
        raise QtoolError(f"{out}: ends in a slash, so it names a folder; give a .txt file path")
    dst = Path(out)
    if dst.suffix.lower() != ".txt":
        raise QtoolError(f"{dst}: give a .txt output path (it becomes a --calib-data text file)")
    if dst.resolve().is_relative_to(src.resolve()):
        raise QtoolError(f"{dst}: lies inside the model folder {src}, which qtool never writes to; "
                         "give a path outside it")
    if dst.is_dir():
        raise QtoolError(f"{dst}: is a folder; give a .txt file path")
    if dst.exists() and not overwrite:
        raise QtoolError(f"{dst}: already exists; give another path or --overwrite")
    if not dst.parent.is_dir():
        raise QtoolError(f"{dst}: its folder {str(dst.parent)!r} does not exist or is not a folder")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise QtoolError(f"{dst}: its folder {str(dst.parent)!r} is not writable; give a path in a folder you can "
                         "write")


class _PartialFile:
    """The finished batches of a run beside its output: a JSON-lines file, first line ``{"key": ...}``, then one
    record a batch. Held under an exclusive lock while a run writes it (a second run on the same output is
    refused); records of a run with another key, and everything from the first damaged line on, are dropped
    (the file is cut back before new records are appended). Removed once the output is complete."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.done, self.finished = path, key, [], False

    def __enter__(self):
        import fcntl

        try:
            self.f = open(self.path, "a+b")
        except OSError as e:
            raise QtoolError(f"{self.path}: the record of finished batches cannot be written there "
                             f"({e.strerror or e}); give an output path in a folder you can write") from None
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise QtoolError(f"{self.path}: another qtool self-calib run is writing this output; wait for it "
                             "or give another -o") from None
        self.f.seek(0)
        good_end = self._read(self.f.read())
        if good_end == 0:
            self.f.truncate(0)
            self._write({"key": self.key})
        else:
            self.f.truncate(good_end)
        return self

    def _read(self, data: bytes) -> int:
        """Fill ``done`` from the file's bytes; return where its last good record ends (0: start afresh)."""
        lines = data.split(b"\n")
        head = _json_line(lines[0]) if lines else None
        if not (isinstance(head, dict) and head.get("key") == self.key):
            if data.strip():
                logger.warning("%s: from a run with another model, dtype, device or options, or damaged; "
                               "starting afresh", self.path)
            return 0
        end = len(lines[0]) + 1
        for line in lines[1:]:
            rec = _json_line(line)
            if not (isinstance(rec, dict) and rec.get("batch") == len(self.done)
                    and isinstance(rec.get("texts"), list) and all(isinstance(t, str) for t in rec["texts"])
                    and isinstance(rec.get("redrawn"), int) and rec["redrawn"] >= 0):
                break
            self.done.append(rec)
            end += len(line) + 1
        if self.done:
            logger.warning("%s: resuming after %d finished batches", self.path, len(self.done))
        return end

    def _write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj).encode() + b"\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def append(self, rec: dict) -> None:
        try:
            self._write(rec)
        except OSError as e:
            raise QtoolError(f"{self.path}: cannot be written ({e.strerror or e}); free the space and rerun the "
                             "same command to resume") from None

    def __exit__(self, *exc):
        if self.finished:
            self.path.unlink(missing_ok=True)
        self.f.close()  # releases the lock
        return False


def _json_line(line: bytes):
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
