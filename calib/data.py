"""Calibration text: where it comes from and how it becomes a batch of token windows.

Two steps, kept apart so each can be tested alone:

1. ``load_texts(source)`` reads documents (a list of strings) from the shipped
   default corpus, a ``.txt``/``.jsonl``/``.parquet`` file or a local Hugging Face
   ``datasets`` folder.
2. ``calibration_batch(tokenizer, texts, n_samples, seqlen, seed)`` joins the
   documents, tokenizes them once and draws ``n_samples`` windows of ``seqlen``
   tokens with a seeded generator: ``[n_samples, seqlen]`` int64. Models that need
   BOS at the start of every sequence (gemma) get it as each window's first token.
"""
from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path

import torch

from quant.config import check_seed
from quant.errors import QtoolError

logger = logging.getLogger(__name__)

# The shipped corpus (calib/corpus/SOURCES.md says where each file comes from).
# Each file is one document, so code keeps its internal blank lines.
DEFAULT_CORPUS_FILES = ("wiki.txt", "fiction.txt", "code.txt")
# The same files by kind of text: the whole-model check scores the kinds a calibration text lacks (check_kinds).
BUILTIN_KINDS = dict(zip(("wiki", "fiction", "code"), DEFAULT_CORPUS_FILES))
_SHARED_PARAGRAPH = 100  # characters: a paragraph this long found in both texts means they share text

# Documents are joined with a blank line; splitting a .txt file on blank lines and
# joining again therefore gives back the text (runs of blank lines become one).
DOC_SEPARATOR = "\n\n"

_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_ACCEPTED = ".txt, .jsonl, .parquet or a folder saved with datasets' save_to_disk"
_TEXT_FIELD = "--text-field (text_field= in the API)"


def load_texts(source: str | Path | None, text_field: str = "text") -> list[str]:
    """Calibration documents from ``source``; ``None`` means the shipped mixed corpus.

    ``source`` may be a ``.txt`` file (documents separated by blank lines), a
    ``.jsonl`` file (one JSON object per line, text in ``text_field``), a
    ``.parquet`` file (column ``text_field``; needs pyarrow) or a folder written by
    ``datasets.Dataset.save_to_disk`` (column ``text_field``; needs datasets).
    Raises ``QtoolError`` for a missing or empty source or an unknown format.
    """
    if source is None:
        return default_corpus()
    path = Path(source)
    if not path.exists():
        raise QtoolError(f"Calibration data {str(path)!r} does not exist; give {_ACCEPTED}.")
    if path.is_dir():
        texts = _read_datasets_dir(path, text_field)
    else:
        readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise QtoolError(
                f"Calibration data {str(path)!r} has the unknown extension {path.suffix!r}; "
                f"give {_ACCEPTED}."
            )
        texts = reader(path) if reader is _read_txt else reader(path, text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QtoolError(f"Calibration data {str(path)!r} holds no text; give a file with at least one document.")
    logger.info("Loaded %d calibration documents (%d characters) from %s", len(texts), sum(map(len, texts)), path)
    return texts


def default_corpus() -> list[str]:
    """The shipped corpus, one document per file (encyclopedic prose, fiction, Python code)."""
    texts = [builtin_text(kind) for kind in BUILTIN_KINDS]
    logger.info("Loaded the default calibration corpus (%d characters)", sum(map(len, texts)))
    return texts


def builtin_text(kind: str) -> str:
    """The shipped document of one kind of text (a key of :data:`BUILTIN_KINDS`)."""
    return resources.files("calib").joinpath("corpus", BUILTIN_KINDS[kind]).read_text(encoding="utf-8")


def check_kinds(calib_texts: list[str]) -> list[str]:
    """The built-in kinds of text (:data:`BUILTIN_KINDS`) that share no paragraph with ``calib_texts``.

    The whole-model check scores its candidates on windows of these kinds beside the guard windows,
    so that a method fitted to the calibration text cannot be kept where it is worse than
    round-to-nearest on other kinds of text; a kind whose text the calibration contains (the default
    corpus, ``calib/corpus/wiki.txt`` given as a file) is left out, since its windows would not be
    held out. A paragraph counts when it is at least ``_SHARED_PARAGRAPH`` characters long.
    """
    seen = {p for t in calib_texts for p in _paragraphs(t)}
    return [kind for kind in BUILTIN_KINDS if not seen & _paragraphs(builtin_text(kind))]


def _paragraphs(text: str) -> set[str]:
    return {p.strip() for p in _BLANK_LINES.split(text.replace("\r\n", "\n")) if len(p.strip()) >= _SHARED_PARAGRAPH}


def _not_utf8(path: Path, e: UnicodeDecodeError) -> QtoolError:
    return QtoolError(f"Calibration file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                      f"offset {e.start}); give a UTF-8 .txt, a .jsonl or a .parquet file.")


def _read_txt(path: Path) -> list[str]:
    """Documents of a text file, separated by one or more blank lines."""
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    return [doc.strip("\n") for doc in _BLANK_LINES.split(text)]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    """The ``text_field`` of every non-empty line of a JSON-lines file."""
    texts = []
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise QtoolError(
                f"Line {lineno} of {str(path)!r} is not valid JSON ({e.msg}); give one JSON object per line."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise QtoolError(
                f"Line {lineno} of {str(path)!r} has no string field {text_field!r}; give every line that field, "
                f"or name the field that holds the text with {_TEXT_FIELD}."
            )
        texts.append(record[text_field])
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    """Column ``text_field`` of a parquet file (pyarrow is an optional dependency)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QtoolError(
            f"Reading {str(path)!r} needs pyarrow, which is not installed; run `pip install pyarrow`."
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged or foreign file
        raise QtoolError(f"Parquet file {str(path)!r} cannot be read ({type(e).__name__}: {e}); give a valid "
                         "parquet file with a text column.") from None
    if text_field not in table.column_names:
        raise QtoolError(
            f"Parquet file {str(path)!r} has no column {text_field!r}; its columns are {table.column_names}: "
            f"name the one that holds the text with {_TEXT_FIELD}."
        )
    return [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]


def _read_datasets_dir(path: Path, text_field: str) -> list[str]:
    """Column ``text_field`` of a dataset saved with ``save_to_disk`` (datasets is optional)."""
    try:
        import datasets
    except ImportError:
        raise QtoolError(
            f"Reading the folder {str(path)!r} needs the datasets package, which is not installed; "
            "run `pip install datasets`."
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise QtoolError(f"Folder {str(path)!r} is not a dataset saved with save_to_disk; give {_ACCEPTED}.") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        logger.info("Dataset %s has splits %s; using %r", path, list(ds), split)
        ds = ds[split]
    if text_field not in ds.column_names:
        raise QtoolError(f"Dataset {str(path)!r} has no column {text_field!r}; its columns are {ds.column_names}: "
                         f"name the one that holds the text with {_TEXT_FIELD}.")
    return [t for t in ds[text_field] if isinstance(t, str)]


def tokenize_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one 1-D int64 tensor of token ids, joined by ``DOC_SEPARATOR``.

    Documents are tokenized in one batched call (fast tokenizers run it in
    parallel) and without special tokens; the separator's ids go between them.
    """
    encode = dict(add_special_tokens=False, verbose=False)
    sep = tokenizer(DOC_SEPARATOR, **encode)["input_ids"]
    ids: list[int] = []
    for i, doc in enumerate(tokenizer(list(texts), **encode)["input_ids"]):
        if i:
            ids.extend(sep)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokens: torch.Tensor, n_samples: int, seqlen: int, seed: int, held_out: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens from 1-D ``tokens``: ``[n_samples, seqlen]``.

    With at least ``n_samples * seqlen`` tokens the windows do not overlap: the
    text is cut into ``len // seqlen`` slots behind a random offset and
    ``n_samples`` slots are drawn without replacement. With fewer tokens the
    windows start at random places and may overlap. Same seed, same windows.
    ``held_out`` says how many of the windows (the last ones) are meant to be held
    out of the search; only the warning uses it.
    """
    if n_samples < 1 or seqlen < 1:
        raise QtoolError(
            f"Calibration needs n_samples >= 1 and seqlen >= 1, got n_samples={n_samples} and seqlen={seqlen}."
        )
    check_seed(seed)
    total = tokens.numel()
    if total < seqlen:
        raise QtoolError(
            f"The calibration text has {total} tokens but one window of seqlen={seqlen} needs {seqlen}; "
            f"give more text or a smaller seqlen."
        )
    gen = torch.Generator().manual_seed(seed)
    if total >= n_samples * seqlen:
        n_slots = total // seqlen
        offset = int(torch.randint(0, total - n_slots * seqlen + 1, (1,), generator=gen))
        slots = torch.randperm(n_slots, generator=gen)[:n_samples]
        starts = offset + slots * seqlen
    else:
        why = (f" (with {held_out} held out, which then repeat text the search sees and check it less; give more "
               "text or fewer --n-samples / --held-out)") if held_out else ""
        logger.warning("Calibration text has %d tokens, fewer than %d x %d; windows will overlap%s",
                       total, n_samples, seqlen, why)
        starts = torch.randint(0, total - seqlen + 1, (n_samples,), generator=gen)
    # [n_samples, 1] + [seqlen] -> [n_samples, seqlen] gather indices
    return tokens[starts[:, None] + torch.arange(seqlen)]


def calibration_batch(tokenizer, texts: list[str], n_samples: int, seqlen: int, seed: int,
                      add_bos: bool = False, held_out: int = 0) -> torch.Tensor:
    """Token windows for calibration: int64 ``[n_samples + held_out, seqlen]``, deterministic in ``seed``;
    the last ``held_out`` windows are for the checks no search sees (:mod:`calib.runner`).

    With ``add_bos`` every window is the tokenizer's BOS followed by ``seqlen - 1``
    text tokens: gemma's activations without a leading BOS are not the ones it serves.
    """
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise QtoolError("The model needs a BOS token at the start of every sequence but its tokenizer defines none; "
                         "give a tokenizer with bos_token set.")
    if bos is not None and seqlen < 2:
        raise QtoolError(f"Calibration with a leading BOS needs seqlen >= 2, got seqlen={seqlen}.")
    tokens = tokenize_documents(tokenizer, texts)
    width = seqlen - (bos is not None)
    logger.info("Calibration text: %d tokens; drawing %d windows of %d%s", tokens.numel(), n_samples + held_out, width,
                " after BOS" if bos is not None else "")
    windows = sample_windows(tokens, n_samples + held_out, width, seed, held_out)
    if bos is None:
        return windows
    return torch.cat([torch.full((n_samples + held_out, 1), bos, dtype=windows.dtype), windows], dim=1)
