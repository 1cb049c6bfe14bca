"""Calibration data: every input format, its errors, and seeded window sampling."""
from __future__ import annotations

import json
import re
from importlib import resources

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from calib.data import (
    DEFAULT_CORPUS_FILES,
    calibration_batch,
    load_texts,
    sample_windows,
    tokenize_documents,
)
from quant.errors import QtoolError


@pytest.fixture(scope="module")
def word_tokenizer():
    """A whitespace word-level tokenizer: word ``wN`` has id N, anything else is [UNK] (id 0)."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


def test_txt_splits_documents_on_blank_lines(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("first doc\nsecond line\n\n\n  \nsecond doc\r\n\r\nthird\n", encoding="utf-8")
    assert load_texts(str(f)) == ["first doc\nsecond line", "second doc", "third"]


def test_jsonl_default_and_custom_field(tmp_path):
    f = tmp_path / "c.jsonl"
    rows = [{"text": "alpha", "body": "one"}, {"text": "beta", "body": "two"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(f) == ["alpha", "beta"]
    assert load_texts(f, text_field="body") == ["one", "two"]


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "ok"}\n{"content": "no"}\n', encoding="utf-8")
    with pytest.raises(QtoolError, match=r"Line 2 of .*c\.jsonl.* 'text'.* with --text-field"):
        load_texts(f)


def test_jsonl_bad_json_names_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(QtoolError, match="Line 2 of"):
        load_texts(f)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a b", "c d"], "other": ["x", "y"]}), f)
    assert load_texts(f) == ["a b", "c d"]
    assert load_texts(f, text_field="other") == ["x", "y"]
    with pytest.raises(QtoolError, match=r"no column 'nope'; its columns are \['text', 'other'\]: .* with --text-field"):
        load_texts(f, text_field="nope")


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["one two", "three"], "n": [1, 2]}).save_to_disk(str(folder))
    assert load_texts(folder) == ["one two", "three"]
    with pytest.raises(QtoolError, match=r"no column 'body'; its columns are \['text', 'n'\]: .* with --text-field"):
        load_texts(folder, text_field="body")


def test_missing_optional_package_gives_install_hint(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    f = tmp_path / "c.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(QtoolError, match="pip install pyarrow"):
        load_texts(f)


@pytest.mark.parametrize("name", ["c.csv", "c.json", "c"])
def test_unknown_extension(tmp_path, name):
    f = tmp_path / name
    f.write_text("text", encoding="utf-8")
    with pytest.raises(QtoolError, match="unknown extension"):
        load_texts(f)


def test_missing_file(tmp_path):
    with pytest.raises(QtoolError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")


@pytest.mark.parametrize("name,content", [("e.txt", ""), ("b.txt", "\n \n\n"), ("e.jsonl", "\n")])
def test_empty_file(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(QtoolError, match="holds no text"):
        load_texts(f)


def test_tokenize_documents_joins_with_separator(word_tokenizer):
    ids = tokenize_documents(word_tokenizer, ["w1 w2", "w3"])
    # "\n\n" is whitespace only, so this tokenizer gives it no ids
    assert ids.tolist() == [1, 2, 3]
    assert ids.dtype == torch.long


def test_batch_shape_dtype_and_windows_are_real_text(word_tokenizer):
    texts = [words(1, 500), words(500, 1000)]
    batch = calibration_batch(word_tokenizer, texts, n_samples=8, seqlen=16, seed=0)
    assert batch.shape == (8, 16) and batch.dtype == torch.long
    # ids count up by one inside the text, so every window is a contiguous run
    assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)


def test_windows_do_not_overlap_when_text_is_long_enough(word_tokenizer):
    batch = calibration_batch(word_tokenizer, [words(1, 1000)], n_samples=30, seqlen=32, seed=3)
    flat = batch.flatten()
    assert flat.unique().numel() == flat.numel()


def test_same_seed_same_batch_and_different_seeds_differ(word_tokenizer):
    texts = [words(1, 1000)]
    a = calibration_batch(word_tokenizer, texts, 4, 16, seed=1)
    b = calibration_batch(word_tokenizer, texts, 4, 16, seed=1)
    c = calibration_batch(word_tokenizer, texts, 4, 16, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_short_text_gives_overlapping_windows(word_tokenizer):
    batch = calibration_batch(word_tokenizer, [words(1, 41)], n_samples=5, seqlen=20, seed=0)
    assert batch.shape == (5, 20)
    assert batch.min() >= 1 and batch.max() <= 40
    assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)


def test_bos_leads_every_window_when_asked(word_tokenizer):
    vocab = {"[UNK]": 0, "[BOS]": 1000, **{f"w{i}": i for i in range(1, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with_bos = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")
    batch = calibration_batch(with_bos, [words(1, 1000)], n_samples=6, seqlen=16, seed=0, add_bos=True)
    assert batch.shape == (6, 16)
    assert batch[:, 0].tolist() == [1000] * 6
    assert torch.all(batch[:, 2:] - batch[:, 1:-1] == 1)  # then 15 tokens of contiguous text
    assert torch.equal(calibration_batch(with_bos, [words(1, 1000)], 6, 16, seed=0), sample_windows(
        tokenize_documents(with_bos, [words(1, 1000)]), 6, 16, seed=0))  # no BOS unless asked
    with pytest.raises(QtoolError, match="tokenizer defines none"):
        calibration_batch(word_tokenizer, [words(1, 1000)], 6, 16, seed=0, add_bos=True)


def test_too_few_tokens_says_how_many(word_tokenizer):
    with pytest.raises(QtoolError, match=r"has 10 tokens .* needs 64"):
        calibration_batch(word_tokenizer, [words(1, 11)], n_samples=2, seqlen=64, seed=0)


def test_sample_windows_rejects_nonpositive_sizes():
    with pytest.raises(QtoolError, match="n_samples=0"):
        sample_windows(torch.arange(100), 0, 8, seed=0)


def test_default_corpus_is_mixed_and_small():
    texts = load_texts(None)
    assert len(texts) == len(DEFAULT_CORPUS_FILES)
    wiki, fiction, code = texts
    assert "def " in code and "import " in code and "return" in code
    assert wiki.count(". ") > 1000 and "def " not in wiki[:100_000]
    assert fiction.count('"') > 100 and ("Chapter" in fiction or "CHAPTER" in fiction)
    folder = resources.files("calib").joinpath("corpus")
    total = sum(len(p.read_bytes()) for p in folder.iterdir() if p.is_file() and p.name.endswith((".txt", ".md")))
    assert total <= 2_000_000
    assert all(len(t.encode()) > 200_000 for t in texts)


def test_default_corpus_holds_only_the_calibration_half():
    """Wikipedia titles and stdlib modules in the corpus all have an odd md5 (eval uses even)."""
    build_corpus = pytest.importorskip("calib.corpus.build_corpus")
    folder = resources.files("calib").joinpath("corpus")
    listing = folder.joinpath("WIKI_TITLES.md").read_text(encoding="utf-8").splitlines()
    titles = [line[2:] for line in listing if line.startswith("- ")]
    modules = re.findall(r"^# File: Lib/(\S+)$", folder.joinpath("code.txt").read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert len(titles) > 1000 and len(modules) > 50
    assert all(build_corpus.md5_is_odd(name) for name in titles + modules)
    assert not build_corpus.md5_is_odd("Aardvark")  # an article of the even (evaluation) half


def test_default_corpus_tokenizes_into_batch(word_tokenizer):
    batch = calibration_batch(word_tokenizer, load_texts(None), n_samples=4, seqlen=64, seed=0)
    assert batch.shape == (4, 64)


def test_the_whole_model_check_scores_the_built_in_kinds_the_calibration_lacks(tmp_path):
    """A kind whose text the calibration contains is not held out, so it is not checked: none for the default
    corpus, fiction and code for the built-in Wikipedia file given as a path, all three for other text; one
    shared paragraph of 100 characters is enough to drop a kind."""
    from calib.data import BUILTIN_KINDS, builtin_text, check_kinds

    assert check_kinds(load_texts(None)) == []
    wiki = resources.files("calib").joinpath("corpus", "wiki.txt")
    assert check_kinds(load_texts(str(wiki))) == ["fiction", "code"]
    other = ["An unrelated text about tide pools and the animals that live in them, " * 3]
    assert check_kinds(other) == list(BUILTIN_KINDS) == ["wiki", "fiction", "code"]
    paragraph = next(p for p in builtin_text("code").split("\n\n") if len(p.strip()) >= 100)
    assert check_kinds(other + [paragraph]) == ["wiki", "fiction"]
