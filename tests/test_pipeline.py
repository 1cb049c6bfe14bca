"""The spine end to end: every architecture row through the API and the CLI, reloaded and compared."""
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from tiny_models import MODEL_TYPES, save_tiny_model
from transformers import AutoModelForCausalLM

import quant
from cli.main import app
from quant import qmath
from quant.arch import ARCHITECTURES
from quant.config import AWQOptions, GPTQOptions, QuantConfig


def fake_quantized_reference(src, bits, group_size, sym=False):
    """The source model with each block linear replaced by its quantize-dequantize (the spec of RTN)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    blocks = model.get_submodule(ARCHITECTURES[model.config.model_type].blocks)
    with torch.no_grad():
        for mod in blocks.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(qmath.fake_quantize(mod.weight, bits, group_size, sym))
    return model


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("entry", ["api", "cli"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_rtn_checkpoint_reloads_to_the_fake_quantized_model(tmp_path, model_type, entry):
    src = save_tiny_model(model_type, tmp_path / "src")
    before = tree_digest(src)
    out = tmp_path / "out"
    if entry == "api":
        quant.quantize(src, out, method="rtn", bits=4, group_size=32, dtype="float32", progress=False)
    else:
        res = CliRunner().invoke(app, ["rtn", str(src), "-o", str(out), "--group-size", "32", "--dtype", "float32"])
        assert res.exit_code == 0, res.output
        assert "linears quantized" in res.output
    assert tree_digest(src) == before, "the source folder changed"
    model = quant.load(out, dtype=torch.float32)
    n_quant = sum(isinstance(m, quant.modules.QuantLinear) for m in model.modules())
    n_linear_in_blocks = sum(isinstance(m, torch.nn.Linear) for m in
                             fake_quantized_reference(src, 4, 32).get_submodule(ARCHITECTURES[model_type].blocks).modules())
    assert n_quant == n_linear_in_blocks
    ref = fake_quantized_reference(src, 4, 32)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    got, want = model(ids).logits, ref(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    assert not torch.allclose(got, fp, atol=1e-5), "quantization changed nothing: the test would not notice"
    generated = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


def test_awq_gemm_checkpoint_contract(tmp_path):
    src = save_tiny_model("qwen2", tmp_path / "src")  # q/k/v biases, tied embeddings
    out = tmp_path / "out"
    quant.quantize(src, out, method="rtn", bits=4, group_size=32, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None,
    }
    assert config["torch_dtype"] == "float16"
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        keys = set(st.keys())
        p = "model.layers.0.self_attn.q_proj"
        assert {f"{p}.qweight", f"{p}.qzeros", f"{p}.scales", f"{p}.bias"} <= keys
        assert f"{p}.weight" not in keys
        assert st.get_tensor(f"{p}.qweight").dtype == torch.int32
        assert tuple(st.get_tensor(f"{p}.qweight").shape) == (64, 64 // 8)  # [in, out/8]
        assert tuple(st.get_tensor(f"{p}.qzeros").shape) == (64 // 32, 64 // 8)
        assert st.get_tensor(f"{p}.scales").dtype == torch.float16
        assert tuple(st.get_tensor(f"{p}.scales").shape) == (2, 64)
        assert "lm_head.weight" not in keys  # tied to the embeddings: stored once
        assert all(st.get_tensor(k).dtype in (torch.int32, torch.float16) for k in keys)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary folder left behind"


def test_skipped_layers_are_listed_and_kept_in_full_precision(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    report = quant.quantize(src, out, method="rtn", group_size=32, skip=("mlp.down_proj",), progress=False)
    assert len(report.skipped) == 2  # one per block
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["mlp.down_proj"]  # kept in every block: once, block-relative
    assert sorted(qc["dynamic"]) == [r"-:^model\.layers\.0\.mlp\.down_proj$", r"-:^model\.layers\.1\.mlp\.down_proj$"]
    model = quant.load(out, dtype=torch.float32)
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear


def test_gptq_layout_for_3_and_8_bits_matches_reference(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    for bits in (3, 8):
        out = tmp_path / f"w{bits}"
        quant.quantize(src, out, method="rtn", bits=bits, group_size=32, dtype="float32", progress=False)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        # asymmetric 3/8-bit: GPTQ v2, the layout GPTQModel and transformers read them in (any zero point)
        assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["checkpoint_format"] == "gptq_v2"
        model = quant.load(out, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        with torch.no_grad():
            for m in ref.model.layers.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(qmath.fake_quantize(m.weight, bits, 32, min_zero=0))
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_info_reports_the_checkpoint(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    quant.quantize(src, out, method="rtn", group_size=32, skip=("mlp.down_proj",), progress=False)
    res = CliRunner().invoke(app, ["info", str(out)])
    assert res.exit_code == 0, res.output
    assert "awq (AWQ gemm layout)" in res.output and "qtool rtn" in res.output
    assert re.search(r"linears quantized\s+12\n", res.output)
    assert re.search(r"linears kept in full precision\s+2\n", res.output)
    assert "model.layers.0.mlp.down_proj" in res.output


def test_overwrite_replaces_only_when_asked(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    quant.quantize(src, out, method="rtn", group_size=32, progress=False)
    first = tree_digest(out)
    quant.quantize(src, out, method="rtn", group_size=64, overwrite=True, progress=False)
    assert tree_digest(out) != first
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64


def test_compact_load_keeps_the_logits_and_the_checkpoint(tmp_path):
    src = save_tiny_model("qwen2", tmp_path / "src")
    out = tmp_path / "w4"
    quant.quantize(src, out, method="rtn", bits=4, group_size=32, dtype="float32", progress=False)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    full = quant.load(out, dtype=torch.float32)
    compact = quant.load(out, dtype=torch.float32, compact=True)
    layers = [m for m in compact.modules() if isinstance(m, quant.modules.QuantLinear)]
    assert layers and all(m.compacted for m in layers)
    assert torch.equal(compact(ids).logits, full(ids).logits)
    want, got = full.state_dict(), compact.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_size_counts_weights_not_qtool_side_files(tmp_path):
    from quant import folder

    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "qtool_search.safetensors").write_bytes(b"x" * 40)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 7)
    assert folder.folder_bytes(tmp_path) == 100  # both formats shipped: the safetensors are what loads
    (tmp_path / "model.safetensors").unlink()
    assert folder.folder_bytes(tmp_path) == 7
    # with a shard index, the shards it names (a consolidated.safetensors beside them is not loaded)
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"x" * 30)
    (tmp_path / "consolidated.safetensors").write_bytes(b"x" * 500)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00001.safetensors"}}')
    assert folder.folder_bytes(tmp_path) == 30


@pytest.mark.parametrize("model_type", ["gemma2", "llama"])
def test_calibration_windows_start_with_bos_where_the_architecture_needs_it(tmp_path, model_type, monkeypatch):
    from quant import block_loop

    seen = {}
    real = block_loop.quantize_blocks

    def spy(model, arch, cfg, plan, calib_ids, *rest):
        seen["ids"] = calib_ids
        return real(model, arch, cfg, plan, calib_ids, *rest)

    monkeypatch.setattr(block_loop, "quantize_blocks", spy)
    src = save_tiny_model(model_type, tmp_path / "src")
    quant.quantize(src, tmp_path / "out", method="awq", bits=4, group_size=32, n_samples=4, seqlen=32,
                   dtype="float32", progress=False)
    ids = seen["ids"]
    bos = json.loads((src / "config.json").read_text())["bos_token_id"]
    assert ids.shape == (4 + sum(QuantConfig(method="awq").held_out_split), 32)  # the held-out windows come along
    assert (ids[:, 0] == bos).all() == ARCHITECTURES[model_type].needs_bos
    assert (ids[:, 1:] != bos).all()


@pytest.mark.parametrize("fmt, bits", [("awq", 4), ("gptq", 3)])
def test_dense_weights_compute_exactly_the_reference_path_and_let_go(fmt, bits):
    from quant.formats import PackedWeight
    from quant.kernels import reference
    from quant.modules import QuantLinear, dense_weights

    g = torch.Generator().manual_seed(0)
    pw = PackedWeight(q=torch.randint(0, 2**bits, (64, 128), generator=g, dtype=torch.int32),
                      scale=torch.rand(64, 4, generator=g) + 0.1,
                      zero=torch.randint(1, 2**bits, (64, 4), generator=g, dtype=torch.int32), bits=bits, group_size=32)
    layer = QuantLinear.from_packed(pw, torch.randn(64, generator=g), fmt)
    block = torch.nn.Sequential(layer)
    x = torch.randn(3, 5, 128, generator=g)
    with dense_weights(block):
        y = block(x)
        assert layer.dense_cache and torch.equal(block(x), y)  # dequantized once, reused
    assert torch.equal(y, reference.linear(x, layer))
    assert layer.dense_cache is None
    with dense_weights(block, hold=False):  # dequantized on every call, never kept: the same numbers
        assert torch.equal(block(x), y) and layer.dense_cache == {}
    assert layer.dense_cache is None and layer.dense_hold


@pytest.mark.parametrize("method, fmt, opts", [
    ("rtn", "awq", {}), ("awq", "awq", {}),
    ("gptq", "gptq", {"bits": 3, "gptq": quant.GPTQOptions(act_order=True)}),
])
def test_methods_leave_dense_weights_that_compute_exactly_what_the_packed_block_computes(method, fmt, opts):
    """Methods compute, formats store: the block a method leaves computes with dense fake-quantized weights
    (the next block's inputs come from plain matmuls), and packing it once gives a block whose outputs are
    bit-identical; the codes never exist only in a packed layer while calibration runs."""
    import copy

    from calib.collectors import record_block_calls
    from calib.runner import BlockInputs, first_output, run_calls
    from quant.layers import to_quant_linears
    from quant.methods import BlockContext, get_method
    from quant.modules import QuantLinear
    from tiny_models import tiny_model

    model = tiny_model("llama")
    arch = ARCHITECTURES["llama"]
    blocks = model.get_submodule(arch.blocks)
    ids = torch.randint(3, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    calls = record_block_calls(model, blocks, ids)[0]  # the first block's inputs, one call for all windows
    names = [n for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)]
    cfg = QuantConfig(method=method, group_size=32, fmt=fmt, **opts)
    result = get_method(method)(BlockContext(0, blocks[0], names, cfg, arch, BlockInputs([calls])))
    assert sorted(result.packed) == sorted(names)
    assert not any(isinstance(m, QuantLinear) for m in blocks[0].modules())
    dense_out = run_calls(blocks[0], [calls])[0]
    packed_block = copy.deepcopy(blocks[0])
    to_quant_linears(packed_block, result.packed, cfg.format)
    assert sum(isinstance(m, QuantLinear) for m in packed_block.modules()) == len(names)
    with torch.no_grad():
        packed_out = first_output(packed_block(calls.hidden, *calls.args, **calls.kwargs))
    assert torch.equal(dense_out, packed_out)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux's /proc")
def test_the_peak_rss_of_a_run_started_by_a_larger_process_is_the_runs_own():
    """A child started by subprocess (vfork + exec) inherits its parent's peak in ru_maxrss; the report's peak is
    the child's own. The parent is a process of its own here, so that this test process keeps its peak."""
    root = Path(__file__).resolve().parents[1]
    child = (f"import sys; sys.path.insert(0, {str(root)!r}); import torch; from quant.heap import peak_rss_mb; "
             "print(peak_rss_mb())")
    parent = ("import resource, subprocess, sys\n"
              "x = bytearray(3 << 30)\n"
              "for i in range(0, len(x), 4096): x[i] = 1\n"
              "del x\n"
              f"out = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True)\n"
              "print(out.stdout.strip())\n")
    import subprocess
    import sys

    peak = float(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout)
    assert 50 < peak < 2 << 10  # MiB: the child imported torch (hundreds of MiB), never held the parent's 3 GiB


@pytest.mark.parametrize("options, message", [
    ({"method": "gptq", "damp": 0.1}, r"'damp' is an option of GPTQOptions; pass gptq=GPTQOptions\(damp=...\)"),
    ({"method": "awq", "n_grid": 5}, r"'n_grid' is an option of AWQOptions; pass awq=AWQOptions\(n_grid=...\)"),
    ({"method": "rtn", "group": 64}, r"'group' is not a quantization setting; use one of .*group_size"),
    ({"method": "rtn", "layout": "awq"}, r"'layout' is not a quantization setting; use one of .*fmt"),  # chosen
    ({"method": "rtn", "max_shard_size": "1GB"}, r"'max_shard_size' is the command line's name; in Python pass "
                                                 r"quantize\(..., max_shard_bytes=N\)"),
    ({"method": "awq", "awq": {"n_grid": 5}}, r"awq must be AWQOptions\(...\), not dict"),
    ({"method": "gptq", "gptq": AWQOptions()}, r"gptq must be GPTQOptions\(...\), not AWQOptions"),
])
def test_an_option_given_to_the_wrong_place_names_where_it_belongs(tmp_path, options, message):
    """quantize(**options) is the Python API's front door: a misplaced keyword gets one sentence, not a TypeError
    about a dataclass, and nothing is written."""
    src = save_tiny_model("llama", tmp_path / "src")
    with pytest.raises(quant.QtoolError, match=message):
        quant.quantize(src, tmp_path / "out", progress=False, **options)
    with pytest.raises(quant.QtoolError, match=message):  # the same on top of a config
        quant.quantize(src, tmp_path / "out", QuantConfig(method="rtn"), progress=False, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("call, message", [
    (lambda src, out: quant.quantize(src, out, {"method": "rtn"}), r"the settings are a dict, not a QuantConfig"),
    (lambda src, out: quant.quantize(src, out, method="rtn", max_shard_bytes=0), r"max_shard_bytes 0 must be"),
    (lambda src, out: quant.quantize(src, out, method="rtn", max_shard_bytes="1GB"), r"max_shard_bytes '1GB'"),
    (lambda src, out: quant.quantize(src, out, method="rtn", skip=[3]), r"skip must be module names"),
    (lambda src, out: quant.quantize(src, out, method="rtn", awq=AWQOptions(n_grid=5)),
     r"awq options are set, but method 'rtn' does not use them"),
    (lambda src, out: quant.quantize(src, out, method="gptq", awq=AWQOptions(n_grid=5)),
     r"awq options are set, but method 'gptq' does not use them; .*awq_first=True"),
    (lambda src, out: quant.quantize(src, out, method="awq", gptq=GPTQOptions(damp=0.1)), r"gptq options are set"),
    # a string where True or False goes was truthy: sym="false" wrote symmetric weights, act_order="no" turned it on
    (lambda src, out: quant.quantize(src, out, method="rtn", sym="false"), r"sym must be True or False, got 'false'"),
    (lambda src, out: quant.quantize(src, out, method="gptq", gptq=GPTQOptions(act_order="no")),
     r"act_order must be True or False"),
    (lambda src, out: quant.quantize(src, out, method="awq", awq=AWQOptions(clip="no")), r"clip must be True or False"),
    (lambda src, out: quant.quantize(src, out, method="gptq", gptq=GPTQOptions(block_size=1.5)),  # the solver's range()
     r"block_size must be a whole number, got 1.5"),
    (lambda src, out: quant.quantize(src, out, method="gptq", gptq=GPTQOptions(damp="0.1")), r"damp must be a number"),
    (lambda src, out: quant.quantize(src, out, method="awq", awq=AWQOptions(n_grid="20")),
     r"n_grid must be a whole number"),
    (lambda src, out: quant.quantize(src, out, method="awq", calib_data=5), r"calib_data must be a string or None"),
    (lambda src, out: quant.quantize(src, out, method="awq", text_field=None), r"text_field must be a string"),
    (lambda src, out: quant.load(None), r"the checkpoint folder is None, not a path"),  # each a TypeError
    (lambda src, out: quant.load_any(None), r"the model folder is None, not a path"),
    (lambda src, out: quant.quantize(None, out, method="rtn"), r"the model folder is None, not a path"),
    (lambda src, out: quant.quantize(src, 3, method="rtn"), r"the output folder is 3, not a path"),
    (lambda src, out: quant.kv.with_kv_cache(object(), "int8"), r"the model given is of type object"),
    (lambda src, out: (Path(src, "config.json").write_text("{bad"), quant.kv.config.calibration_reference(src)),
     r"config.json: is not valid JSON"),  # a JSONDecodeError
    (lambda src, out: quant.load_any(src, dtype="bogus"), r"dtype 'bogus' is not one"),
    (lambda src, out: quant.load_any(src, dtype=torch.int8), r"dtype torch.int8 is not one"),
    (lambda src, out: quant.perplexity(None, None, "text", seqlen=64.0), r"seqlen 64.0 must be a whole number"),
    (lambda src, out: quant.kv.with_kv_cache(None, None), r"pass a KVCacheConfig"),
    (lambda src, out: quant.kv.KVCacheConfig(bits=8.0), r"--kv bits 8.0"),
    (lambda src, out: quant.kv.KVCacheConfig(window=True), r"--kv-window True"),
    (lambda src, out: quant.kv.KVCacheConfig(bits=4, keys="channel", calibration="c.safetensors"),
     r"pass KVCalibration.load\(path\)"),
])
def test_the_python_api_refuses_wrong_values_in_one_sentence(tmp_path, call, message):
    """Each gave a TypeError, KeyError or AttributeError (some only at a later call), or was taken: max_shard_bytes
    0 wrote a shard per tensor, a '1GB' string failed mid-run and left the temporary folder behind."""
    src = save_tiny_model("llama", tmp_path / "src")
    with pytest.raises(quant.QtoolError, match=message):
        call(src, tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name != "src"]


def test_paths_given_as_pathlib_paths_and_the_resume_key_keep_their_spelling(tmp_path):
    """A resumable run's key records the layout written under "fmt", as before the layout asked for and the one
    written were two fields (a stopped run of the earlier code still resumes); a pathlib.Path calibration file or
    search file is kept as the string it spells (the records are JSON)."""
    import json as json_module

    from quant.pipeline import _run_settings
    settings = _run_settings(QuantConfig(bits=8), None)
    assert settings["fmt"] == "gptq_v2" and "layout" not in settings
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = QuantConfig(method="gptq", calib_data=text, awq=AWQOptions(search_file=tmp_path / "s.safetensors"))
    assert cfg.calib_data == str(text) and cfg.awq.search_file == str(tmp_path / "s.safetensors")
    json_module.dumps(_run_settings(cfg, None))
    src = save_tiny_model("llama", tmp_path / "src")
    quant.quantize(src, tmp_path / "out", method="gptq", calib_data=text, n_samples=4, seqlen=32, group_size=32,
                   progress=False)
    recorded = json_module.loads((tmp_path / "out" / "qtool.json").read_text())
    assert str(text) in json_module.dumps(recorded)


def test_skip_given_as_one_name_is_that_name_not_its_characters(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    quant.quantize(src, tmp_path / "out", method="rtn", group_size=32, skip="mlp.down_proj", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert any("down_proj" in n for n in config["modules_to_not_convert"])
