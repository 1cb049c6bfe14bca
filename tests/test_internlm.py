"""InternLM2 / InternLM3 checkpoints read and written without their remote code (quant.layouts)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from internlm_models import fuse_wqkv, llama, save_internlm2
from safetensors.torch import load_file, save_file
from test_bad_input import assert_refused, run_cli
from tiny_models import byte_tokenizer

import quant
from cli.main import app
from quant import model_io
from quant.config import GPTQOptions
from quant.errors import QtoolError
from quant.formats import get_format

IDS = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
SETTINGS = dict(bits=4, group_size=32, n_samples=8, seqlen=64, progress=False, overwrite=True)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])  # GQA ratios 1, 2 and 4
def test_internlm2_runs_as_the_llama_it_was_made_from(tmp_path, heads, kv_heads):
    ref = llama(heads, kv_heads)
    src = save_internlm2(ref, tmp_path / "internlm2")
    model, tok = quant.load_any(src)
    assert type(model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-6)
    out = model.generate(IDS[:1, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref.generate(IDS[:1, :8], max_new_tokens=6, do_sample=False))
    assert tok("abc").input_ids == byte_tokenizer()("abc").input_ids  # tokenizer.json, no remote class


def test_dynamic_ntk_rope_follows_internlm2s_formula(tmp_path):
    """Past max_position_embeddings the RoPE base grows as InternLM2's remote code computes it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    src = save_internlm2(llama(4, 2), tmp_path / "m", rope_scaling={"type": "dynamic", "factor": 2.0})
    config = model_io.model_config(src)
    d, base, max_pos, factor, seq = 16, 1e6, config.max_position_embeddings, 2.0, 3 * 256
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=seq)
    grown = base * ((factor * seq / max_pos) - (factor - 1)) ** (d / (d - 2))
    want = 1.0 / grown ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(inv_freq.double(), want, rtol=1e-6, atol=0)


def _split_fused(t: torch.Tensor, n_heads: int, n_kv: int, d: int) -> list[torch.Tensor]:
    g = n_heads // n_kv
    v = t.reshape(n_kv, g + 2, d, *t.shape[1:])
    return [v[:, :g].reshape(-1, *t.shape[1:]), v[:, g].reshape(-1, *t.shape[1:]), v[:, g + 1].reshape(-1, *t.shape[1:])]


@pytest.mark.parametrize("method,fmt", [("rtn", "awq"), ("awq", "awq"), ("gptq", "gptq"), ("awq+gptq", "awq")])
def test_checkpoint_is_the_llamas_in_internlm2s_layout(tmp_path, method, fmt):
    """Quantizing the InternLM2 checkpoint gives the Llama's quantized checkpoint, fused and renamed, bit for bit;
    it keeps InternLM2's config and reloads to the same logits."""
    ref = llama(4, 2)
    ref.save_pretrained(tmp_path / "llama")
    byte_tokenizer().save_pretrained(tmp_path / "llama")
    src = save_internlm2(ref, tmp_path / "internlm2")
    (src / "modeling_internlm2.py").write_text("raise RuntimeError('remote code ran')\n")  # copied, never run
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    kw = dict(SETTINGS, method=method, fmt=fmt)
    if method == "awq+gptq":
        kw.update(method="gptq", gptq=GPTQOptions(awq_first=True))
    quant.quantize(tmp_path / "llama", tmp_path / "q-llama", **kw)
    quant.quantize(src, tmp_path / "q-internlm2", **kw)
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before  # the source is untouched

    config = json.loads((tmp_path / "q-internlm2" / "config.json").read_text())
    assert config["model_type"] == "internlm2" and "auto_map" in config
    assert (tmp_path / "q-internlm2" / "modeling_internlm2.py").read_bytes() == before["modeling_internlm2.py"]
    assert config["quantization_config"]["quant_method"] == get_format(fmt).quant_method
    want, got = load_file(tmp_path / "q-llama" / "model.safetensors"), load_file(tmp_path / "q-internlm2" / "model.safetensors")
    assert not [k for k in got if "self_attn" in k or "mlp." in k or "embed_tokens" in k]
    spec = quant.formats.spec.read_spec(tmp_path / "q-internlm2")
    f = spec.format
    for i in range(2):
        p = f"model.layers.{i}."
        leaves = {k.rsplit(".", 1)[1] for k in got if k.startswith(p + "attention.wqkv.")}
        assert "qweight" in leaves
        fused = f.unpack({leaf: got[f"{p}attention.wqkv.{leaf}"] for leaf in leaves}, 4, 32)
        parts = [f.unpack({leaf: want[f"{p}self_attn.{n}_proj.{leaf}"] for leaf in leaves}, 4, 32) for n in "qkv"]
        for field in ("q", "scale", "zero"):
            assert torch.equal(getattr(fused, field), fuse_wqkv(*[getattr(pw, field) for pw in parts], 2, 16))
        assert torch.equal(got[p + "feed_forward.w2.qweight"], want[p + "mlp.down_proj.qweight"])
        assert torch.equal(got[p + "attention.wo.scales"], want[p + "self_attn.o_proj.scales"])
    assert torch.equal(got["output.weight"], want["lm_head.weight"])
    assert torch.equal(got["model.tok_embeddings.weight"], want["model.embed_tokens.weight"])

    a = quant.load(tmp_path / "q-internlm2", dtype=torch.float32)
    b = quant.load(tmp_path / "q-llama", dtype=torch.float32)
    assert torch.equal(logits(a), logits(b))
    assert a.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)


def test_gptq_act_order_gives_q_k_and_v_one_column_order(tmp_path):
    """The fused wqkv holds one g_idx: q, k and v (value rows under their own Hessians) share act-order's order."""
    src = save_internlm2(llama(4, 2), tmp_path / "internlm2")
    quant.quantize(src, tmp_path / "q", method="gptq", fmt="gptq", gptq=GPTQOptions(act_order=True), held_out=0, **SETTINGS)
    got = load_file(tmp_path / "q" / "model.safetensors")
    g_idx = got["model.layers.0.attention.wqkv.g_idx"]
    assert not torch.equal(g_idx, torch.arange(64, dtype=g_idx.dtype) // 32)  # an act-order order
    model = quant.load(tmp_path / "q", dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.g_idx, attn.v_proj.g_idx) and torch.equal(attn.k_proj.g_idx, g_idx)
    fp = model_io.load_fp_model(src)
    rel = (logits(model) - logits(fp)).norm() / logits(fp).norm()
    assert rel < 0.2


def test_fused_projection_splits_and_fuses_back_bit_exactly():
    from quant.formats import PackedWeight
    from quant.layouts import INTERNLM2, Shape

    shape = Shape(8, 2, 16)
    g = torch.Generator().manual_seed(0)
    rows = (8 + 2 * 2) * 16
    pw = PackedWeight(torch.randint(0, 16, (rows, 64), generator=g, dtype=torch.int32),
                      torch.rand(rows, 2, generator=g).half(), torch.randint(1, 16, (rows, 2), generator=g), 4, 32)
    for name in ("awq", "gptq", "gptq_v2"):
        fmt = get_format(name)
        stored = {f"model.layers.3.attention.wqkv.{k}": t for k, t in fmt.pack(pw).items()}
        stored["model.layers.3.attention.wqkv.bias"] = torch.randn(rows, generator=g)
        native = INTERNLM2.to_native(stored, shape, fmt, 4, 32)
        q = native["model.layers.3.self_attn.q_proj.bias"]
        assert torch.equal(q, _split_fused(stored["model.layers.3.attention.wqkv.bias"], 8, 2, 16)[0])
        back = INTERNLM2.to_stored(native, shape, fmt, 4, 32)
        assert back.keys() == stored.keys() and all(torch.equal(back[k], stored[k]) for k in stored)


def test_early_internlm_model_type_and_the_cli(tmp_path):
    ref = llama(4, 2)
    src = save_internlm2(ref, tmp_path / "m", model_type="internlm")
    torch.testing.assert_close(logits(model_io.load_fp_model(src)), logits(ref), rtol=0, atol=1e-6)
    res = CliRunner().invoke(app, ["awq", str(src), "-o", str(tmp_path / "q"), "--n-samples", "8", "--seqlen", "64",
                                   "--group-size", "32"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model_type"] == "internlm"
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    for model, args in ((src, []), (tmp_path / "q", []), (tmp_path / "q", ["--kv", "int8"])):
        res = CliRunner().invoke(app, ["ppl", str(model), "--data", str(text), "--seqlen", "64", *args])
        assert res.exit_code == 0, res.output


def test_the_first_internlm_keeps_its_llama_names_and_biases(tmp_path):
    """internlm-7b/20b (model_type "internlm", InternLMForCausalLM) store Llama's names with biases on q, k, v and o;
    they were read as early InternLM2 checkpoints and written in InternLM2's layout (wqkv, feed_forward.w1, ...)
    under a config.json still saying InternLMForCausalLM, which neither its code nor vLLM's Llama class reads."""
    import shutil

    ref = llama(4, 4, attention_bias=True)
    ref.save_pretrained(tmp_path / "llama")
    byte_tokenizer().save_pretrained(tmp_path / "llama")
    src = shutil.copytree(tmp_path / "llama", tmp_path / "internlm")
    config = json.loads((src / "config.json").read_text())
    for key in ("attention_bias", "mlp_bias", "rope_parameters", "transformers_version"):
        config.pop(key, None)
    config.update({"model_type": "internlm", "architectures": ["InternLMForCausalLM"], "bias": True,
                   "rope_theta": 1e6, "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                                                   "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"}})
    (src / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(logits(model_io.load_fp_model(src)), logits(ref), rtol=0, atol=1e-6)
    for folder in ("internlm", "llama"):
        quant.quantize(tmp_path / folder, tmp_path / f"q-{folder}", method="rtn", **SETTINGS)
    stored = load_file(str(tmp_path / "q-internlm" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.qweight" in stored and "model.layers.0.self_attn.o_proj.bias" in stored
    assert not any("wqkv" in k or "feed_forward" in k for k in stored)
    assert set(stored) == set(load_file(str(tmp_path / "q-llama" / "model.safetensors")))
    assert json.loads((tmp_path / "q-internlm" / "config.json").read_text())["architectures"] == ["InternLMForCausalLM"]
    torch.testing.assert_close(logits(quant.load(tmp_path / "q-internlm", dtype=torch.float32)),
                               logits(quant.load(tmp_path / "q-llama", dtype=torch.float32)), rtol=0, atol=0)


def test_internlm3_through_the_layout_where_transformers_lacks_its_class(tmp_path, monkeypatch):
    """Newer transformers run InternLM3 natively; older ones go through the layout (Llama names, mapped config)."""
    from quant import arch

    model = llama(4, 2, head_dim=16)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(model_type="internlm3", qkv_bias=False, bias=False, architectures=["InternLM3ForCausalLM"],
                  auto_map={"AutoModelForCausalLM": "modeling_internlm3.InternLM3ForCausalLM"})
    for k in ("attention_bias", "mlp_bias", "rope_parameters"):  # as the released config.json: rope_theta instead
        config.pop(k, None)
    config["rope_theta"] = 1e6
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(arch, "has_native_class", lambda model_type: False)
    assert arch.layout_of(config) is not None
    torch.testing.assert_close(logits(model_io.load_fp_model(tmp_path / "m")), logits(model), rtol=0, atol=1e-6)
    config["qkv_bias"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(QtoolError, match="qkv_bias"):
        model_io.model_config(tmp_path / "m")


def _edit_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def test_the_config_dtype_is_what_auto_loads_as_for_the_remote_code(tmp_path):
    """The layout's mapped config dropped torch_dtype: a float32 checkpoint whose config.json says bfloat16 loaded as
    float32 under "auto", where transformers (with the remote code) loads it as bfloat16."""
    src = save_internlm2(llama(4, 2), tmp_path / "m")
    _edit_config(src, torch_dtype="bfloat16")
    assert model_io.model_config(src).dtype == torch.bfloat16
    model = model_io.load_fp_model(src, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_wqkv_that_does_not_match_the_config_is_one_sentence(tmp_path, capsys):
    src = save_internlm2(llama(4, 2), tmp_path / "m")
    _edit_config(src, num_key_value_heads=4)
    code, err = run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32"], capsys)
    assert_refused(code, err, "attention.wqkv.weight", "128 rows", "needs 192")
    assert not (tmp_path / "q").exists()


def test_skip_takes_internlm2s_own_names(tmp_path):
    """--skip feed_forward.w2 / attention.wqkv: kept in full precision, fused, and declared under InternLM2's names."""
    src = save_internlm2(llama(4, 2), tmp_path / "m")
    quant.quantize(src, tmp_path / "q", method="rtn", bits=4, group_size=32, progress=False,
                   skip=("feed_forward.w2", "attention.wqkv"))
    got = load_file(tmp_path / "q" / "model.safetensors")
    source = load_file(src / "model.safetensors")
    for i in range(2):
        p = f"model.layers.{i}."
        assert torch.equal(got[p + "attention.wqkv.weight"], source[p + "attention.wqkv.weight"].half())  # float16 output
        assert torch.equal(got[p + "feed_forward.w2.weight"], source[p + "feed_forward.w2.weight"].half())
        assert p + "feed_forward.w1.qweight" in got
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    from quant.formats.compat import kept_from_dynamic

    qc = config["quantization_config"]
    assert qc["modules_to_not_convert"] == ["attention.wqkv", "feed_forward.w2"]  # in every block: block-relative
    skipped = kept_from_dynamic(qc["dynamic"])  # the exact names, in the checkpoint's own (stored) names
    assert {f"model.layers.{i}.{m}" for i in range(2) for m in ("attention.wqkv", "feed_forward.w2")} <= set(skipped)
    assert not [s for s in skipped if "self_attn" in s or "mlp." in s]
    model = quant.load(tmp_path / "q", dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_an_awq_replay_compares_skip_by_the_linears_it_names_in_internlm2s_names_too(tmp_path):
    """For a layout family the replay compared the search's --skip with the run's as text: the search's own
    --skip feed_forward.w2 (recorded as the native linears it stands for) was refused as another skip."""
    src = save_internlm2(llama(4, 2), tmp_path / "m")
    opts = dict(method="awq", bits=4, group_size=32, n_samples=4, seqlen=32, dtype="float32", progress=False,
                held_out=0)
    quant.quantize(src, tmp_path / "a", skip=("feed_forward.w2",), **opts)
    search = quant.AWQOptions(search_file=str(tmp_path / "a"))
    for i, skip in enumerate(["feed_forward.w2", "mlp.down_proj"]):  # one linear, its stored and its native name
        quant.quantize(src, tmp_path / f"r{i}", skip=(skip,), awq=search, **opts)
        assert (tmp_path / f"r{i}" / "model.safetensors").read_bytes() == \
            (tmp_path / "a" / "model.safetensors").read_bytes()
    with pytest.raises(QtoolError, match=r"made with --skip feed_forward.w2, .* but this run has --skip feed_forward.w1;"):
        quant.quantize(src, tmp_path / "b", skip=("feed_forward.w1",), awq=search, **opts)
    assert not (tmp_path / "b").exists()


def test_q_k_v_stay_together_when_one_cannot_be_packed(tmp_path):
    """3-bit GPTQ packing needs whole words: 16-row k/v cannot be packed, so q (64 rows) stays in full
    precision with them and the fused wqkv is written whole, instead of a refusal the user did not cause."""
    src = save_internlm2(llama(4, 1), tmp_path / "m")  # k and v: 16 rows each
    quant.quantize(src, tmp_path / "q", method="rtn", bits=3, group_size=32, progress=False, fmt="gptq")
    got = load_file(tmp_path / "q" / "model.safetensors")
    assert "model.layers.0.attention.wqkv.weight" in got and "model.layers.0.feed_forward.w1.qweight" in got
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    from quant.formats.compat import kept_from_dynamic

    assert "model.layers.0.attention.wqkv" in kept_from_dynamic(qc["dynamic"])  # stored names, as loaders read them
    assert set(qc["modules_to_not_convert"]) & {"model.layers.0.attention.wqkv", "attention.wqkv"}


def test_a_config_that_does_not_match_the_tensors_is_one_sentence(tmp_path, capsys):
    src = save_internlm2(llama(4, 2), tmp_path / "m")
    _edit_config(src, intermediate_size=256)
    code, err = run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32"], capsys)
    assert_refused(code, err, "feed_forward.w", "has shape", "config.json")
    _edit_config(src, intermediate_size=128, rope_scaling={"type": "dynamic", "factor": "abc"})
    code, err = run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32"], capsys)
    assert_refused(code, err, "rope_scaling factor")


def test_an_overflow_is_said_in_the_checkpoints_names_by_every_command(tmp_path, capsys):
    """rtn's float16 refusal named InternLM2's weights in the Llama names qtool computes in (mlp.up_proj), where ppl's
    named them as the checkpoint does (feed_forward.w3); a norm beyond bfloat16's range was named so too."""
    src = save_internlm2(llama(4, 2), tmp_path / "m")
    f = src / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.feed_forward.w3.weight"][0, 0] = 1e6  # its group scale past float16: kept unquantized
    save_file(tensors, str(f), metadata={"format": "pt"})
    said = "--dtype float16: model.layers.0.feed_forward.w3.weight holds values up to 1e+06, beyond float16's"
    assert_refused(*run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32", "--dtype", "float16"], capsys),
                   said)
    assert_refused(*run_cli(["ppl", src, "--max-tokens", "64", "--seqlen", "32", "--dtype", "float16"], capsys), said)
    tensors["model.layers.0.feed_forward.w3.weight"][0, 0] = 0.5
    tensors["model.layers.1.attention_norm.weight"][0] = 3.4e38  # beyond bfloat16's 3.39e38
    save_file(tensors, str(f), metadata={"format": "pt"})
    code, err = run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32", "--dtype", "bfloat16"], capsys)
    assert_refused(code, err, "--dtype bfloat16: model.layers.1.attention_norm.weight holds values up to 3.4e+38, beyond bfloat16's")
    assert not (tmp_path / "q").exists()


def test_a_quantized_checkpoints_damage_and_kept_layers_are_said_in_its_own_names(tmp_path, capsys):
    """ppl on a quantized InternLM2 checkpoint named a NaN ffn_norm `post_attention_layernorm`, an inf wqkv scale
    `self_attn.q_proj.scales`, and the first overflowing module `self_attn.q_proj`; the quantize commands' warnings
    named the layers they keep `self_attn.q_proj` (three of them for one wqkv tensor)."""
    src = save_internlm2(llama(4, 2), tmp_path / "m")
    f = src / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.attention.wqkv.weight"][0, 0] = 1e6  # its group scale past float16: kept unquantized
    save_file(tensors, str(f), metadata={"format": "pt"})
    code, err = run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32", "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    kept = [ln for ln in err.splitlines() if "stays in full precision" in ln]
    assert len(kept) == 1 and "model.layers.0.attention.wqkv stays in full precision" in kept[0], err
    assert "q_proj" not in err
    out = tmp_path / "q" / "model.safetensors"
    good = load_file(str(out))
    args = ["ppl", tmp_path / "q", "--max-tokens", "64", "--seqlen", "32"]
    for name, said in (("model.layers.1.ffn_norm.weight", "model's tensor model.layers.1.ffn_norm.weight holds NaN"),
                       ("model.layers.1.attention.wqkv.scales",
                        "model's tensor model.layers.1.attention.wqkv.scales holds NaN")):
        bad = dict(good)
        bad[name] = bad[name].clone()
        bad[name].view(-1)[0] = float("nan")
        save_file(bad, str(out), metadata={"format": "pt"})
        assert_refused(*run_cli(args, capsys), said)
    bad = dict(good)
    bad["model.layers.0.attention.wqkv.weight"] = bad["model.layers.0.attention.wqkv.weight"] * 1e20  # q·k overflows float32
    save_file(bad, str(out), metadata={"format": "pt"})
    assert_refused(*run_cli(args, capsys), "first in model.layers.0.attention.wo")  # after the softmax


def test_info_and_the_targets_name_the_loaders_that_read_internlm2s_own_layout(tmp_path, capsys):
    """info said transformers 5.24, GPTQModel 7.6 and AutoAWQ read InternLM2 checkpoints right; transformers has no
    internlm2 class (the folder's remote code breaks on it), and the others are not established."""
    src = save_internlm2(llama(4, 2), tmp_path / "m")
    assert run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32"], capsys)[0] == 0
    res = CliRunner().invoke(app, ["info", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "read right by" in line)
    assert "vLLM" in row and "transformers" not in row and "GPTQModel" not in row and "AutoAWQ" not in row, row
    assert "no internlm2 model class" in res.output
    code, err = run_cli(["rtn", src, "-o", tmp_path / "t", "--group-size", "32", "--target", "transformers"], capsys)
    assert_refused(code, err, "--target transformers", "no internlm2 model class")
    assert not (tmp_path / "t").exists()


def test_a_group_size_that_does_not_fit_internlm2s_fused_tensors_is_one_sentence_in_ppl(tmp_path, capsys):
    """info refused it; ppl split wqkv by the config's group size and ended in load_state_dict's traceback."""
    src = save_internlm2(llama(4, 2), tmp_path / "m")
    quant.quantize(src, tmp_path / "q", method="rtn", **SETTINGS)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["group_size"] = 16
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["ppl", tmp_path / "q", "--max-tokens", "64", "--seqlen", "32"], capsys)
    assert_refused(code, err, "the checkpoint does not match its config.json")


@pytest.mark.parametrize("skip, kept", [("attention", {"attention.wqkv", "attention.wo"}),
                                        ("model.layers.0.attention", {"attention.wqkv", "attention.wo"}),
                                        ("feed_forward", {"feed_forward.w1", "feed_forward.w2", "feed_forward.w3"})])
def test_skip_takes_internlm2s_modules_and_the_counts_are_its_own(tmp_path, capsys, skip, kept):
    """--skip attention (InternLM2's module) was refused, suggesting self_attn.q_proj, a name its files do not hold;
    the summary counted q, k and v as three linears (14 quantized) where info counts the one wqkv (10)."""
    from quant.info import checkpoint_info

    src = save_internlm2(llama(4, 2), tmp_path / "m")
    report = quant.quantize(src, tmp_path / "q", method="rtn", bits=4, group_size=32, progress=False, skip=(skip,))
    blocks = (0,) if "layers.0" in skip else (0, 1)
    assert set(report.skipped) == {f"model.layers.{i}.{m}" for i in blocks for m in kept}
    info = checkpoint_info(tmp_path / "q")
    assert (report.n_quantized, len(report.skipped)) == (info.n_quantized, len(info.skipped))
    assert report.n_quantized + len(report.skipped) == 2 * 5  # wqkv, wo, w1, w2, w3 in each of 2 blocks
    code, err = run_cli(["rtn", src, "-o", tmp_path / "typo", "--skip", "feed_forwrd.w2"], capsys)
    assert_refused(code, err, "did you mean feed_forward.w2")
    assert "self_attn" not in err and "mlp." not in err
