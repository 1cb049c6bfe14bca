"""A small real-model check: SmolLM2-135M, RTN w4 g64, perplexity on held-out Wikipedia.

The model is fetched by the set-up (``python benchmarks/example_data.py``, part of
``make test``), never by the test; without it in the cache the test skips.
"""
import sys
from pathlib import Path

import pytest
import torch

import quant
from quant.info import checkpoint_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from example_data import eval_text_path, example_model_dir

MODEL = example_model_dir()
pytestmark = [pytest.mark.realmodel, pytest.mark.skipif(
    not (MODEL / "config.json").is_file(), reason="example model not in the cache (run benchmarks/example_data.py)")]
TOKENS = 2048


def test_smollm2_rtn_w4_g64(tmp_path):
    torch.manual_seed(0)
    text = eval_text_path("wiki").read_text()
    out = tmp_path / "smol-rtn"
    report = quant.quantize(MODEL, out, method="rtn", bits=4, group_size=64, progress=False)
    assert report.n_quantized == 30 * 7 and not report.skipped  # every block linear of 30 layers
    fp, tok = quant.load_any(MODEL, dtype="float32", device="cpu")
    fp_ppl = quant.perplexity(fp, tok, text, seqlen=512, max_tokens=TOKENS).ppl
    del fp
    q, tok = quant.load_any(out, dtype="float32", device="cpu")
    q_ppl = quant.perplexity(q, tok, text, seqlen=512, max_tokens=TOKENS).ppl
    # Measured on this text: fp32 about 12-14; RTN w4 g64 costs a few points but stays the same model.
    assert 8 < fp_ppl < 20
    assert fp_ppl * 1.02 < q_ppl < fp_ppl * 1.6, (fp_ppl, q_ppl)
    info = checkpoint_info(out)
    assert info.n_quantized == 210 and info.ratio > 1.8
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert q.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
