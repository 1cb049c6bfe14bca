"""Perplexity windows: what is scored, and that it equals the hand computation."""
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from tiny_models import byte_tokenizer, save_tiny_model, tiny_model

import quant
from cli.main import app

TEXT = "The quick brown fox jumps over the lazy dog. " * 6


def test_non_overlapping_windows_match_a_hand_computation():
    model, tok = tiny_model("llama"), byte_tokenizer()
    ids = tok(TEXT, add_special_tokens=False).input_ids
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ids) - 1, 32):
            w = torch.tensor(ids[b:b + 32])[None]
            if w.shape[1] < 2:
                continue
            logits = model(w).logits[0, :-1]
            nll += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            count += w.shape[1] - 1
    res = quant.perplexity(model, tok, TEXT, seqlen=32)
    assert res.n_tokens == count
    assert math.isclose(res.ppl, math.exp(nll / count), rel_tol=1e-5)


def test_strided_windows_score_every_token_after_the_first_once():
    model, tok = tiny_model("llama"), byte_tokenizer()
    n = len(tok(TEXT, add_special_tokens=False).input_ids)
    res = quant.perplexity(model, tok, TEXT, seqlen=32, stride=8)
    assert res.n_tokens == n - 1
    assert res.n_windows == math.ceil((n - 32) / 8) + 1


def test_gemma_windows_start_with_bos_and_score_every_token():
    model, tok = tiny_model("gemma3_text"), byte_tokenizer()
    n = len(tok(TEXT, add_special_tokens=False).input_ids)
    with_bos = quant.perplexity(model, tok, TEXT, seqlen=32)
    assert with_bos.n_tokens == n  # the first token of each window is predicted from BOS
    without = quant.perplexity(model, tok, TEXT, seqlen=32, add_bos=False)
    assert without.n_tokens < n and without.ppl != with_bos.ppl


def test_ppl_command_on_a_checkpoint(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    quant.quantize(src, tmp_path / "out", method="rtn", group_size=32, progress=False)
    (tmp_path / "t.txt").write_text(TEXT)
    runner = CliRunner()
    res = runner.invoke(app, ["ppl", str(tmp_path / "out"), "--data", str(tmp_path / "t.txt"), "--seqlen", "32"])
    assert res.exit_code == 0, res.output
    q_ppl = float(res.output.strip().splitlines()[-1].split("|")[3])
    res_fp = runner.invoke(app, ["ppl", str(src), "--data", str(tmp_path / "t.txt"), "--seqlen", "32"])
    fp_ppl = float(res_fp.output.strip().splitlines()[-1].split("|")[3])
    assert q_ppl > 1 and fp_ppl > 1 and q_ppl != fp_ppl


def _count_unpacks(monkeypatch):
    """Counts QuantLinear.packed_weight() calls (each is one unpack of a layer's codes)."""
    from quant.modules import QuantLinear

    calls = []
    original = QuantLinear.packed_weight

    def counted(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(QuantLinear, "packed_weight", counted)
    return calls


def test_a_checkpoint_on_the_cpu_is_scored_with_each_weight_dequantized_once(tmp_path, monkeypatch):
    """fp32 on the CPU takes the reference path, which unpacks every layer on every forward; perplexity
    dequantizes each layer once instead: the same number, one unpack per layer for all windows."""
    from quant import ppl as ppl_module
    from quant.modules import QuantLinear

    src = save_tiny_model("llama", tmp_path / "src")
    quant.quantize(src, tmp_path / "out", method="rtn", group_size=32, progress=False)
    model, tok = quant.load_any(tmp_path / "out", dtype="float32", device="cpu")
    n_layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    calls = _count_unpacks(monkeypatch)
    once = quant.perplexity(model, tok, TEXT, seqlen=32)
    assert once.n_windows > 2 and len(calls) == n_layers
    assert all(m.dense_cache is None for m in model.modules() if isinstance(m, QuantLinear))  # let go

    calls.clear()
    monkeypatch.setattr(ppl_module, "_available_bytes", lambda: 1024)  # the dense copies do not fit
    every = quant.perplexity(model, tok, TEXT, seqlen=32)
    assert len(calls) == n_layers * every.n_windows
    assert every.ppl == once.ppl and every.n_tokens == once.n_tokens


def test_available_memory_is_known_on_this_machine():
    from quant.ppl import _available_bytes

    avail = _available_bytes()
    assert avail is not None and 0 < avail < 2**50


def test_a_text_that_is_not_one_string_and_a_bos_the_tokenizer_lacks_are_refused():
    """A list of documents was scored as its first alone, and add_bos=True without a BOS token as add_bos=False."""
    model, tok = tiny_model("llama"), byte_tokenizer()
    with pytest.raises(quant.QtoolError, match="the text to score must be one string .* not list"):
        quant.perplexity(model, tok, [TEXT, TEXT], seqlen=32)
    tok.bos_token = None
    assert tok.bos_token_id is None
    with pytest.raises(quant.QtoolError, match="add_bos=True, but the tokenizer has no BOS token"):
        quant.perplexity(model, tok, TEXT, seqlen=32, add_bos=True)
    gemma = tiny_model("gemma3_text")  # its default BOS, where there is none: windows without one
    assert quant.perplexity(gemma, tok, TEXT, seqlen=32).ppl == quant.perplexity(gemma, tok, TEXT, seqlen=32,
                                                                                  add_bos=False).ppl
