"""AWQ: the searches on synthetic data, exact folds on every architecture row, replay, CLI."""
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import CONFIGS, MODEL_TYPES, byte_tokenizer, save_tiny_model, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from quant.config import SEARCH_FILE
import quant
from calib.collectors import record_block_calls
from calib.runner import BlockInputs
from cli.main import app
from quant import qmath
from quant.arch import ARCHITECTURES, ScaleGroup
from quant.awq import CLIP_KEY, SCALE_KEY, apply_search, load_search, quantize_block
from quant.awq.fold import fold_scales, foldable_groups, group_scales, tie_to_values
from quant.awq.search import (
    QuantSpec,
    _fake_quantize,
    output_error,
    search_clip,
    search_scale,
)
from quant.config import AWQOptions, QuantConfig
from quant.errors import QtoolError
from quant.methods import BlockContext

ROOT = Path(__file__).resolve().parents[1]
SPEC = QuantSpec(bits=4, group_size=32)


def outlier_inputs(n=2048, in_f=128, seed=0):
    """Activations with a few large channels, like a real LLM's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g)
    x[:, [3, 40, in_f - 5]] *= 30.0
    return x


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_search_rounds_exactly_like_the_reference(sym, group_size):
    w = 3 * torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    clip = 0.5 + 0.5 * torch.rand(16, qmath.n_groups(64, group_size), generator=torch.Generator().manual_seed(1))
    for c in (None, clip):
        assert torch.equal(_fake_quantize(w, QuantSpec(4, group_size, sym), c), qmath.fake_quantize(w, 4, group_size, sym, c))


def test_scale_search_beats_rtn_on_outlier_channels():
    x = outlier_inputs()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    res = search_scale(w, x.t() @ x, x.abs().mean(0), SPEC, n_grid=20)
    rtn = qmath.fake_quantize(w, 4, 32)
    awq = qmath.fake_quantize(w * res.scale, 4, 32) / res.scale
    err_rtn = (x @ (w - rtn).t()).pow(2).mean()
    err_awq = (x @ (w - awq).t()).pow(2).mean()
    assert res.ratio > 0
    assert err_awq < 0.5 * err_rtn
    # The closed form over H is the error on the tokens, and α = 0 is RTN.
    torch.testing.assert_close(res.errors[0], (x @ (w - rtn).t()).pow(2).sum(), rtol=1e-4, atol=0)


def test_scale_search_chunks_rows_and_grid_under_its_memory_budget(monkeypatch):
    """A budget of a few rows' temporaries gives the same errors and choice as one batch of everything."""
    from quant.awq import search

    x = outlier_inputs()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    whole = search_scale(w, x.t() @ x, x.abs().mean(0), SPEC, n_grid=20)
    sizes = []
    real_fq = search._fake_quantize
    monkeypatch.setattr(search, "_fake_quantize", lambda ws, spec, c=None: sizes.append(ws.numel()) or real_fq(ws, spec, c))
    monkeypatch.setattr(search, "MEMORY_BUDGET", 16 * 128 * 7)  # 7 rows' temporaries at one grid point
    chunked = search_scale(w, x.t() @ x, x.abs().mean(0), SPEC, n_grid=20)
    assert max(sizes) <= 7 * 128 and len(sizes) > 20  # each call within the budget, rows split
    torch.testing.assert_close(chunked.errors, whole.errors, rtol=1e-5, atol=0)
    assert chunked.ratio == whole.ratio and torch.equal(chunked.scale, whole.scale)


def test_clip_search_never_increases_the_group_error():
    x = outlier_inputs(in_f=64)
    h = x.t() @ x
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    w[0, 5] = 8.0  # one outlier weight makes clipping worth it
    clip = search_clip(w, h, SPEC, n_grid=20, max_shrink=0.5)
    assert clip.shape == (32, 2) and (clip <= 1).all() and (clip >= 0.5).all()
    assert (clip < 1).any()
    hb = torch.block_diag(h[:32, :32], h[32:, 32:])  # the search ignores cross-group terms
    assert output_error(w - qmath.fake_quantize(w, 4, 32, clip=clip), hb) <= output_error(w - qmath.fake_quantize(w, 4, 32), hb)


def _mha_model(model_type):
    """A tiny model without grouped-query attention, so that v -> o folds too."""
    heads = CONFIGS[model_type].get("num_attention_heads", 4)
    config = AutoConfig.for_model(model_type, **dict(CONFIGS[model_type], num_key_value_heads=heads))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


# Groups each row folds: phi3's fused outputs have no exact fold for o/down; the others fold all four
# (v -> o under grouped-query attention too).
EXPECTED_GROUPS = {"phi3": 2}


@pytest.mark.parametrize("model_type", MODEL_TYPES + ["llama-mha"])
def test_folding_scales_preserves_the_logits(model_type):
    model = _mha_model("llama") if model_type == "llama-mha" else tiny_model(model_type)
    arch = ARCHITECTURES[model.config.model_type]
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    g = torch.Generator().manual_seed(1)
    n_groups = []
    for block in model.get_submodule(arch.blocks):
        groups = foldable_groups(block, arch, list(arch.linears))
        n_groups.append(len(groups))
        scales = {}
        for grp in groups:
            width = block.get_submodule(grp.linears[0]).in_features
            scales.update(group_scales(grp, tie_to_values(block, grp, torch.exp(torch.randn(width, generator=g)))))
        fold_scales(block, arch, scales)
    with torch.no_grad():
        out = model(ids).logits
    assert not torch.equal(out, ref)  # something was folded...
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # ...and the function is the same
    assert set(n_groups) == {EXPECTED_GROUPS.get(model_type, 4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_returns_a_float32_blocks_own_parameters_and_copies_only_other_dtypes(dtype):
    """The folded float32 weights that AWQ quantizes are, for a float32 block (any block on the CPU), the
    block's own parameters folded in place, so the block is not held twice (2.3 GiB on a Qwen3-30B-A3B
    block); a bf16 block gets float32 values that round to its parameters. Either way the values are those
    of the division and multiplication the fold is defined by; a scale that cannot fold leaves the block
    unchanged."""
    model = tiny_model("llama").to(dtype)
    arch = ARCHITECTURES["llama"]
    block = model.model.layers[0]
    before = {k: v.float().clone() for k, v in block.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    groups = foldable_groups(block, arch, list(arch.linears))
    scales = {}
    for grp in groups:
        width = block.get_submodule(grp.linears[0]).in_features
        scales.update(group_scales(grp, tie_to_values(block, grp, torch.exp(torch.randn(width, generator=g)))))
    broken = dict(scales, **{k: v.clone().index_fill_(0, torch.tensor([0]), 7.0)  # breaks v -> o under GQA
                             for k, v in scales.items() if "o_proj" in k})
    with pytest.raises(ValueError, match="differs between query heads"):
        fold_scales(block, arch, broken)
    assert all(torch.equal(v.float(), before[k]) for k, v in block.state_dict().items())
    weights = fold_scales(block, arch, scales)
    norm = scales["self_attn.q_proj.awq_scale"]
    q = weights["self_attn.q_proj.weight"]
    assert q.dtype == torch.float32
    assert torch.equal(q, before["self_attn.q_proj.weight"] * norm[None, :])
    assert torch.equal(weights["input_layernorm.weight"], before["input_layernorm.weight"] / norm)
    for name, w in weights.items():
        p = block.get_parameter(name)
        if dtype == torch.float32:
            assert w.data_ptr() == p.data_ptr(), name
        else:
            assert w.data_ptr() != p.data_ptr() and torch.equal(w.to(dtype), p), name


def test_grouped_query_values_fold_only_a_scale_shared_by_their_query_heads(tmp_path):
    """v -> o under GQA: the searched o_proj scale is equal on the columns that read one value channel, and
    results that break that are refused, not folded into a different function."""
    src = save_tiny_model("llama", tmp_path / "src")  # 4 query heads, 2 key/value heads of 16
    _quantize(src, tmp_path / "a", awq=AWQOptions(judge="error"))  # a scale the squared error picks
    search = load_search(tmp_path / "a")
    s = search[f"model.layers.0.self_attn.o_proj.{SCALE_KEY}"].reshape(2, 2, 16)  # [kv head, its query heads, d]
    assert torch.equal(s[:, 0], s[:, 1]) and not torch.equal(s[0], s[1])
    assert not torch.equal(s, torch.ones_like(s))
    broken = dict(search)
    broken[f"model.layers.0.self_attn.o_proj.{SCALE_KEY}"] = s.clone().index_fill_(1, torch.tensor([1]), 2.0).flatten()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with pytest.raises(quant.QtoolError, match="differs between query heads"):
        apply_search(model, broken, QuantConfig(method="awq", group_size=32))


def block_context(model, cfg, index=0, arch=None):
    arch = arch or ARCHITECTURES[model.config.model_type]
    blocks = model.get_submodule(arch.blocks)
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    call = record_block_calls(model, blocks, ids)[index]
    names = [n for n in arch.linears if isinstance(blocks[index].get_submodule(n), torch.nn.Linear)]
    return BlockContext(index, blocks[index], names, cfg, arch, BlockInputs([call]))


def test_a_group_that_does_not_fold_exactly_is_dropped_with_a_warning(caplog):
    model = tiny_model("llama")
    good = ARCHITECTURES["llama"]
    # gate -> down is wrong: SiLU(gate) is not homogeneous, so the fold would change the function.
    bad = ScaleGroup("mlp.gate_proj", ("mlp.down_proj",), "linear")
    from dataclasses import replace

    arch = replace(good, scale_groups=good.scale_groups[:3] + (bad,))
    ctx = block_context(model, QuantConfig(method="awq", group_size=32), arch=arch)
    with caplog.at_level(logging.WARNING, logger="quant.awq"):
        result = quantize_block(ctx)
    assert "drops scaling group mlp.gate_proj -> mlp.down_proj" in caplog.text
    assert f"mlp.down_proj.{SCALE_KEY}" not in result.artifacts
    assert f"mlp.gate_proj.{SCALE_KEY}" in result.artifacts
    assert "mlp.down_proj" in result.packed  # quantized all the same
    assert torch.equal(ctx.block.mlp.down_proj.weight, result.packed["mlp.down_proj"].dequantize())


@pytest.mark.parametrize("source", ["bfloat16", "float32"])
def test_the_fold_check_backs_up_a_bf16_models_block_in_bf16_and_restores_it_exactly(monkeypatch, source):
    """The fold check keeps a copy of the block to restore when a group does not fold exactly: for a bf16 model's
    block (computed in float32) that copy is bf16, half the memory of a float32 clone, and what it restores is
    the same block: the same scales, clips and codes as with a float32 clone."""
    import quant.awq as awq_module
    from dataclasses import replace

    good, real = ARCHITECTURES["llama"], awq_module._backup
    arch = replace(good, scale_groups=good.scale_groups[:3] + (ScaleGroup("mlp.gate_proj", ("mlp.down_proj",), "linear"),))

    def run(backup):
        model = tiny_model("llama")
        if source == "bfloat16":
            model = model.to(torch.bfloat16).float()
        monkeypatch.setattr(awq_module, "_backup", backup)
        return quantize_block(block_context(model, QuantConfig(method="awq", group_size=32), arch=arch))

    dtypes = []

    def spy(t):
        b = real(t)
        dtypes.append((t.dtype, b.dtype))
        return b

    kept, cloned = run(spy), run(lambda t: t.clone())
    floats = [b for t, b in dtypes if t == torch.float32]
    assert floats and set(floats) == {getattr(torch, source)}
    assert f"mlp.down_proj.{SCALE_KEY}" not in kept.artifacts  # the group was dropped: the block was restored
    assert kept.artifacts.keys() == cloned.artifacts.keys()
    assert all(torch.equal(kept.artifacts[k], cloned.artifacts[k]) for k in kept.artifacts)
    assert all(torch.equal(kept.packed[n].q, cloned.packed[n].q) for n in kept.packed)


def test_skipped_linears_are_not_quantized_and_their_group_still_folds():
    model = tiny_model("qwen2")
    ctx = block_context(model, QuantConfig(method="awq", group_size=32))
    ctx.names.remove("self_attn.k_proj")
    result = quantize_block(ctx)
    assert "self_attn.k_proj" not in result.packed and "self_attn.q_proj" in result.packed
    assert f"self_attn.k_proj.{CLIP_KEY}" not in result.artifacts
    assert f"self_attn.q_proj.{CLIP_KEY}" in result.artifacts


def _quantize(src, out, **kw):
    # held_out=0: these test the search and its replay; on a tiny random model the guards' verdicts are noise
    # (tests/test_guard.py tests the guards).
    opts = dict(method="awq", bits=4, group_size=32, n_samples=4, seqlen=32, dtype="float32", progress=False, held_out=0)
    return quant.quantize(src, out, **(opts | kw))


def test_same_inputs_give_a_bit_identical_checkpoint_and_replay_matches(tmp_path):
    src = save_tiny_model("qwen2", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    _quantize(src, tmp_path / "b")
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / SEARCH_FILE).read_bytes() == \
        (tmp_path / "b" / SEARCH_FILE).read_bytes()
    search = load_search(tmp_path / "a")
    assert any(k.endswith(SCALE_KEY) for k in search) and any(k.endswith(CLIP_KEY) for k in search)
    # Replay through the pipeline (no calibration) ...
    _quantize(src, tmp_path / "c", awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == a
    # ... and on a model in memory.
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    apply_search(model, search, QuantConfig(method="awq", group_size=32))
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    state = model.state_dict()
    for k, v in saved.items():
        if k.endswith(("qweight", "qzeros", "scales")):
            assert torch.equal(state[k], v), k


def test_replaying_an_empty_search_file_says_it_gives_rtn(tmp_path, caplog):
    """A run whose every block kept RTN saves an empty search file; its replay gives RTN, and says so."""
    from safetensors.torch import save_file

    src = save_tiny_model("llama", tmp_path / "src")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with caplog.at_level(logging.WARNING, logger="quant.awq"):
        _quantize(src, tmp_path / "out", awq=AWQOptions(search_file=str(empty)))
    assert "holds no AWQ search results" in caplog.text
    _quantize(src, tmp_path / "rtn", method="rtn")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "rtn" / "model.safetensors").read_bytes()
    with pytest.raises(QtoolError, match="no such search results file"):  # before any work
        _quantize(src, tmp_path / "missing", awq=AWQOptions(search_file=str(tmp_path / "nope.safetensors")))
    assert not (tmp_path / "missing").exists()
    (tmp_path / "bare").mkdir()
    with pytest.raises(QtoolError, match=f"^{re.escape(str(tmp_path / 'bare'))}: holds no search results file"):
        _quantize(src, tmp_path / "missing", awq=AWQOptions(search_file=str(tmp_path / "bare")))
    assert not (tmp_path / "missing").exists()
    (tmp_path / "bare" / "awq_search.refused.safetensors").write_bytes(empty.read_bytes())
    with pytest.raises(QtoolError, match="holds only the search of a model the whole-model check did not keep"):
        _quantize(src, tmp_path / "missing", awq=AWQOptions(search_file=str(tmp_path / "bare")))


def test_qtool_json_records_the_settings_the_run_used(tmp_path, monkeypatch):
    """A replay calibrates nothing and searches nothing: its qtool.json held n_samples 128, clip true and the other
    search defaults as if used, and the search file as typed. Now: the file read, resolved, and no calibration; RTN
    records no calibration either, and each method only its own options."""
    import json

    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    _quantize(src, tmp_path / "b", awq=AWQOptions(search_file="a"))
    quant.quantize(src, tmp_path / "r", method="rtn", bits=4, group_size=32, progress=False)

    def config(name):
        return json.loads((tmp_path / name / "qtool.json").read_text())["qtool"]["config"]

    searched, replayed, rtn = config("a"), config("b"), config("r")
    assert searched["n_samples"] == 4 and searched["awq"]["clip"] is True and "gptq" not in searched
    assert replayed["awq"] == {"search_file": str(tmp_path / "a" / SEARCH_FILE)}  # the file read, not the folder
    assert not {"n_samples", "seqlen", "calib_data", "held_out", "gptq"} & set(replayed)
    assert not {"n_samples", "seqlen", "calib_data", "held_out", "awq", "gptq"} & set(rtn)
    assert rtn["bits"] == 4 and rtn["group_size"] == 32


def test_a_replay_takes_the_checkpoint_its_qtool_folder_or_the_file(tmp_path):
    """`--apply-search ckpt/qtool` looked for ckpt/qtool/qtool/awq_search.safetensors and said so."""
    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    want = (tmp_path / "a" / "model.safetensors").read_bytes()
    for i, given in enumerate((tmp_path / "a", tmp_path / "a" / "qtool", tmp_path / "a" / SEARCH_FILE)):
        _quantize(src, tmp_path / f"r{i}", awq=AWQOptions(search_file=str(given)))
        assert (tmp_path / f"r{i}" / "model.safetensors").read_bytes() == want, given


def test_replay_is_bit_identical_for_a_bfloat16_model(tmp_path):
    # The search runs on the block cast to float32, the replay on the stored bfloat16 block.
    src = save_tiny_model("gemma3_text", tmp_path / "src", dtype=torch.bfloat16)
    _quantize(src, tmp_path / "a", dtype="auto")
    _quantize(src, tmp_path / "b", dtype="auto", awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_replay_refuses_results_from_another_setting(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    with pytest.raises(quant.QtoolError, match="group size 32, with zero points, but this run is .* group size 64"):
        _quantize(src, tmp_path / "b", group_size=64, awq=AWQOptions(search_file=str(tmp_path / "a")))


def test_replay_refuses_a_search_made_with_another_skip(tmp_path):
    """A search made with --skip holds no scales for those linears: replayed without it, they got plain RTN
    without a word (the reverse, a skip the search did not have, was already refused). With the same --skip the
    replay is the searched checkpoint, bit for bit."""
    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a", skip=("mlp.down_proj",))
    with pytest.raises(QtoolError, match=r"made with --skip mlp.down_proj, .* but this run has no --skip"):
        _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert not (tmp_path / "b").exists()
    _quantize(src, tmp_path / "c", skip=("mlp.down_proj",), awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    # the same linears under another spelling are the same skip (it was refused as text)
    _quantize(src, tmp_path / "d", skip=("down_proj",), awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    with pytest.raises(QtoolError, match=r"made with --skip mlp.down_proj, .* but this run has --skip up_proj"):
        _quantize(src, tmp_path / "e", skip=("up_proj",), awq=AWQOptions(search_file=str(tmp_path / "a")))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    apply_search(model, tmp_path / "a", QuantConfig(method="awq", bits=4, group_size=32, skip=("down_proj",)))


def test_replay_refuses_a_search_made_for_other_bits_or_another_depth(tmp_path):
    """Shapes alone do not tell a 4-bit search from a 3-bit one, nor a model from a shallower one of the
    same width (whose missing blocks would silently get round-to-nearest): the search file says what it was
    made for, and the replay refuses anything else before writing any output."""
    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    with pytest.raises(QtoolError, match=r"made for a llama model of 2 blocks at 4-bit, group size 32, with zero "
                                         r"points, but this run is a llama model of 2 blocks at 3-bit"):
        _quantize(src, tmp_path / "b", bits=3, awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert not (tmp_path / "b").exists()
    deeper = tiny_model("llama", seed=1)
    deeper.model.layers.append(tiny_model("llama", seed=2).model.layers[0])
    deeper.config.num_hidden_layers += 1
    deeper.save_pretrained(tmp_path / "deeper")
    byte_tokenizer().save_pretrained(tmp_path / "deeper")
    with pytest.raises(QtoolError, match="of 2 blocks .* but this run is a llama model of 3 blocks"):
        _quantize(tmp_path / "deeper", tmp_path / "c", awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert not (tmp_path / "c").exists()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with pytest.raises(QtoolError, match="at 3-bit"):  # the API's replay checks the same
        apply_search(model, tmp_path / "a", QuantConfig(method="awq", bits=3, group_size=32))


def test_replay_refuses_a_search_made_on_another_model_of_the_same_shape(tmp_path):
    """Same architecture, blocks, bits and group size, other weights (another seed): its scales and clips were
    fitted to other weights and used to replay without a word. The same weights stored as bfloat16 still replay,
    and a search file from before the weights were recorded is checked on its settings alone."""
    import json

    from safetensors.torch import save_file

    src = save_tiny_model("llama", tmp_path / "src")
    other = save_tiny_model("llama", tmp_path / "other", seed=1)
    _quantize(src, tmp_path / "a")
    with pytest.raises(QtoolError, match=r"made on other weights than this model's \(model.layers.0.self_attn.q_proj"
                                         r".weight holds"):
        _quantize(other, tmp_path / "b", awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert not (tmp_path / "b").exists()
    model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    with pytest.raises(QtoolError, match="made on other weights"):  # the API's replay checks the same
        apply_search(model, tmp_path / "a", QuantConfig(method="awq", bits=4, group_size=32))
    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(half)
    byte_tokenizer().save_pretrained(half)
    _quantize(half, tmp_path / "c", awq=AWQOptions(search_file=str(tmp_path / "a")))
    with safe_open(str(tmp_path / "a" / SEARCH_FILE), framework="pt") as f:
        made_for = json.loads(f.metadata()["qtool_awq_search"])
    assert made_for["weights"]["tensor"] == "model.layers.0.self_attn.q_proj.weight"
    del made_for["weights"]
    header = {"qtool_awq_search": json.dumps(made_for, sort_keys=True)}
    entries = load_file(str(tmp_path / "a" / SEARCH_FILE))
    # Every block's entries say the weights they were searched on, whatever the header says ...
    probed = tmp_path / "probed.safetensors"
    save_file(entries, str(probed), metadata=header)
    with pytest.raises(QtoolError, match=re.escape(f"{probed}, block 0: the search was made on other weights")):
        _quantize(other, tmp_path / "d", awq=AWQOptions(search_file=str(probed)))
    # ... a model that differs in one later block only (a partial fine-tune, a merge) is refused there ...
    mixed = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    mixed.model.layers[1].mlp.load_state_dict(tiny_model("llama", seed=1).model.layers[1].mlp.state_dict())
    mixed.save_pretrained(tmp_path / "mixed")
    byte_tokenizer().save_pretrained(tmp_path / "mixed")
    with pytest.raises(QtoolError, match=r"block 1: the search was made on other weights than this model's \(mlp\."):
        _quantize(tmp_path / "mixed", tmp_path / "d", awq=AWQOptions(search_file=str(tmp_path / "a")))
    # ... and so is a fine-tune's change of half a percent.
    tuned = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.dim() == 2:
                p.mul_(1 + 0.005 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tuned.save_pretrained(tmp_path / "tuned")
    byte_tokenizer().save_pretrained(tmp_path / "tuned")
    with pytest.raises(QtoolError, match="made on other weights"):
        _quantize(tmp_path / "tuned", tmp_path / "d", awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert not (tmp_path / "d").exists()
    # A file from before the weights were recorded is checked on its settings alone.
    older = tmp_path / "older.safetensors"
    save_file({k: v for k, v in entries.items() if not k.endswith(".awq_source_weights")}, str(older), metadata=header)
    _quantize(other, tmp_path / "d", awq=AWQOptions(search_file=str(older)))


@pytest.mark.parametrize("header", ['{"bits": 4', '[1, 2]', 'null', '{"bits": 3}',
                                    '{"bits": 4.0, "blocks": 2, "group_size": 32, "model_type": "llama", "sym": 0}',
                                    '{"bits": 4, "blocks": 2, "group_size": 32, "model_type": "llama", "sym": false, '
                                    '"method": "awq"}',
                                    '{"bits": 4, "blocks": 2, "group_size": 32, "model_type": "llama", "sym": false, '
                                    '"weights": {"tensor": "model.layers.0.self_attn.q_proj.weight", "values": [1]}}',
                                    '{"bits": 4, "blocks": 2, "group_size": 32, "model_type": "llama", "sym": false, '
                                    '"weights": {"tensor": "model.layers.0.self_attn.q_proj.weight", '
                                    '"values": [' + ", ".join(["NaN"] * 16) + ']}}'])
def test_a_search_file_with_a_damaged_header_or_no_safetensors_is_refused_in_one_sentence(tmp_path, header):
    from safetensors.torch import load_file, save_file

    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(tmp_path / "a" / SEARCH_FILE)), str(bad), metadata={"qtool_awq_search": header})
    with pytest.raises(QtoolError, match="header is damaged"):
        _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(bad)))
    bad.write_text("not safetensors at all")
    for replay in (lambda: _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(bad))),
                   lambda: load_search(bad)):
        with pytest.raises(QtoolError, match="is not a safetensors search results file"):
            replay()
    assert not (tmp_path / "b").exists()


def test_a_search_file_without_settings_replays_with_a_warning(tmp_path, caplog):
    """A search file from a qtool before the settings were saved still replays (shapes are checked)."""
    from safetensors.torch import load_file, save_file

    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(tmp_path / "a" / SEARCH_FILE)), str(old))
    with caplog.at_level(logging.WARNING, logger="quant.awq"):
        _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(old)))
    assert "does not say which model and settings" in caplog.text
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    with safe_open(str(tmp_path / "b" / SEARCH_FILE), "pt") as f:  # the replay does not vouch for settings it was
        assert not f.metadata()                                      # never told



def test_cli_end_to_end(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["awq", str(src), "-o", str(out), "--group-size", "32", "--n-samples", "4",
                                   "--seqlen", "32", "--n-grid", "5", "--clip-grid", "10", "--dtype", "float32", "-v"])
    assert res.exit_code == 0, res.output
    assert "awq α" in res.output and "linears quantized" in res.output
    assert (out / SEARCH_FILE).is_file()
    # No loader that reads every top-level *.safetensors (vLLM without an index) sees the search file.
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    model = quant.load(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (1, 16))
    with torch.no_grad():
        q, r = model(ids).logits, ref(ids).logits
    assert torch.isfinite(q).all()
    assert (q - r).norm() < 0.5 * r.norm()
    replay = CliRunner().invoke(app, ["awq", str(src), "-o", str(tmp_path / "replay"), "--group-size", "32",
                                      "--dtype", "float32", "--apply-search", str(out / SEARCH_FILE)])
    assert replay.exit_code == 0, replay.output
    assert (tmp_path / "replay" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # A checkpoint folder from an older qtool (search file at the top level) replays too.
    old = tmp_path / "old"
    old.mkdir()
    (old / "qtool_search.safetensors").write_bytes((out / SEARCH_FILE).read_bytes())
    again = CliRunner().invoke(app, ["awq", str(src), "-o", str(tmp_path / "again"), "--group-size", "32",
                                     "--dtype", "float32", "--apply-search", str(old)])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--bits", "5"], "--bits 5"),
    (["--group-size", "48"], "--group-size 48"),
    (["--n-grid", "0"], "--n-grid 0"),
    (["--clip-grid", "0"], "--clip-grid 0"),
    (["--judge", "mse"], "--judge 'mse' is not a judge; use loss"),
    (["--fisher-probes", "65"], "--fisher-probes 65 is out of range"),
])
def test_cli_bad_options_get_one_clear_sentence(tmp_path, args, message):
    src = save_tiny_model("llama", tmp_path / "src")
    res = subprocess.run([sys.executable, "-m", "cli.main", "awq", str(src), "-o", str(tmp_path / "out")] + args,
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not Path(tmp_path / "out").exists()


@pytest.mark.parametrize("change", ["drop up", "up differs"])
def test_the_linears_of_one_input_need_one_scale_in_a_search_file(tmp_path, change):
    """gate and up read one input, so a file must scale both by the same values: a file that scales gate alone was
    told "different input scales"; now the sentence names the entry it lacks. Different values keep their sentence."""
    from safetensors.torch import save_file

    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / SEARCH_FILE))
    with safe_open(str(tmp_path / "a" / SEARCH_FILE), "pt") as f:
        meta = f.metadata()
    gate, up = (f"model.layers.1.mlp.{n}_proj.{SCALE_KEY}" for n in ("gate", "up"))
    if change == "drop up":
        del tensors[up]
    else:
        tensors[up] = tensors[gate].flip(0)  # other values, still a normalised scale (max x min = 1)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    said = "the file scales mlp.gate_proj.awq_scale and not mlp.up_proj.awq_scale" if change == "drop up" else \
        "get different input scales"
    with pytest.raises(QtoolError, match=rf"{bad}, block 1: mlp\.gate_proj, mlp\.up_proj .*{re.escape(said)}"):
        _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(bad)))
    assert not (tmp_path / "b").exists()


def _crafted(tmp_path, change) -> tuple[Path, Path]:
    """The tiny llama, its AWQ search, and a copy of the search file (header kept) edited by ``change(tensors)``."""
    from safetensors.torch import load_file, save_file

    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / SEARCH_FILE))
    with safe_open(str(tmp_path / "a" / SEARCH_FILE), "pt") as f:
        meta = f.metadata()
    change(tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    return src, bad


@pytest.mark.parametrize("names, factor", [(("gate", "up"), 1e30), (("gate", "up"), 1e-30), (("down",), 1e30),
                                           (("down",), 2.0)])
def test_a_scale_changed_after_its_search_is_refused_naming_its_entry(tmp_path, names, factor):
    """Every value finite and positive, but the whole scale multiplied (x1e30: the linears' float16 group scales
    overflow; x1e-30: they would all be 0 and the norm before them overflows float16; down_proj's x1e30 zeroes
    up_proj, which it divides): the replay wrote a broken model silently, or failed far from the cause. Every search
    normalises a scale to max x min = 1; a multiplied one is refused by file and entry, and nothing is written."""
    keys = [f"model.layers.1.mlp.{n}_proj.{SCALE_KEY}" for n in names]

    def scale(tensors):
        for key in keys:
            tensors[key] = tensors[key] * factor

    src, bad = _crafted(tmp_path, scale)
    with pytest.raises(QtoolError, match=rf"{bad}: entry 'model\.layers\.1\.mlp\.({'|'.join(names)})_proj\.{SCALE_KEY}' "
                                         rf"has max x min = .*normalises every scale to max x min = 1"):
        _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(bad)))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("factor, said", [(1.5, "infinite"), (0.5, None)])
def test_normalised_scales_that_push_a_linear_past_float16_are_refused_naming_the_entries(tmp_path, factor, said):
    """Scales still normalised (the largest entry times c, the smallest divided by c) that make gate/up's largest
    folded weight 1.5x float16's largest value: the group scales fit float16 but the weights the loaders dequantize
    do not (all-NaN logits). Refused naming the block and the entries; at 0.5x it replays (float32 output)."""
    from safetensors.torch import load_file

    keys = [f"model.layers.1.mlp.{n}_proj.{SCALE_KEY}" for n in ("gate", "up")]

    def stretch(tensors):
        s = tensors[keys[0]]
        hi, lo = int(s.argmax()), int(s.argmin())
        block = load_file(str(tmp_path / "src" / "model.safetensors"))
        top = max(float(block[k.replace(SCALE_KEY, "weight")][:, hi].abs().max()) for k in keys) * float(s[hi])
        c = factor * qmath.FP16_MAX / top
        s = s.clone()
        s[hi], s[lo] = s[hi] * c, s[lo] / c
        for key in keys:
            tensors[key] = s.clone()

    src, bad = _crafted(tmp_path, stretch)
    if said is None:
        _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(bad)))
        model = quant.load(tmp_path / "b", dtype=torch.float32)
        assert model(torch.randint(3, 300, (1, 16))).logits.isfinite().all()
        return
    with pytest.raises(QtoolError, match=rf"{bad}, block 1: with mlp\.(gate|up)_proj\.{SCALE_KEY}, mlp\.(gate|up)_proj's "
                                         rf"weights reach .* {said}"):
        _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(bad)))
    assert not (tmp_path / "b").exists()


def test_a_models_own_search_replays_where_its_weights_are_too_small_for_float16_group_scales(tmp_path):
    """Block 1's o_proj weights scaled by 1e-5 (largest about 1e-6: its group scales are below float16's smallest
    before any AWQ scale): the search quantizes it, and the replay of that search was refused ('its float16 group
    scales would be zero; search again', which no search could change). Now it replays, bit for bit."""
    from safetensors.torch import load_file, save_file

    src = save_tiny_model("llama", tmp_path / "src")
    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.1.self_attn.o_proj.weight"] *= 1e-5
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    _quantize(src, tmp_path / "a")
    assert f"model.layers.1.self_attn.o_proj.{SCALE_KEY}" in load_search(tmp_path / "a")
    _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(tmp_path / "a")))
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("kind, value, said", [
    (SCALE_KEY, 0.0, "values from 0 to"), (SCALE_KEY, -1.0, "values from -1 to"), (SCALE_KEY, math.inf, "non-finite"),
    (SCALE_KEY, math.nan, "non-finite"), (CLIP_KEY, 1.5, "to 1.5"), (CLIP_KEY, 0.0, "values from 0 to"),
    (CLIP_KEY, 1e-30, "values from 1e-30 to"), (CLIP_KEY, math.nan, "non-finite")])
def test_a_search_file_with_values_no_search_writes_is_refused_in_one_sentence(tmp_path, kind, value, said):
    """A scale of 0 or inf, or a clip outside [MIN_CLIP, 1], would quantize silently to a float16 scale of 65504 or 0
    (or fail deep inside with a traceback): the replay names the file and the entry instead, and writes nothing."""
    from safetensors.torch import load_file, save_file

    src = save_tiny_model("llama", tmp_path / "src")
    _quantize(src, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / SEARCH_FILE))
    with safe_open(str(tmp_path / "a" / SEARCH_FILE), "pt") as f:
        meta = f.metadata()
    key = next(k for k in sorted(tensors) if k.endswith(kind) and k.startswith("model.layers.1."))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(QtoolError, match=rf"{bad}: entry '{re.escape(key)}' holds .*{re.escape(said)}"):
        _quantize(src, tmp_path / "b", awq=AWQOptions(search_file=str(bad)))
    assert not (tmp_path / "b").exists()
