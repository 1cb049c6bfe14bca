"""The compatibility table at work: the layout a target reads right, refusals before any work, the keys that
tell every loader which layers stay in full precision, and `qtool info`'s list of loaders."""
import json

import pytest
from test_bad_input import assert_refused, run_cli, run_cli_out
from tiny_models import save_tiny_model

from quant.errors import QtoolError
from quant.formats.compat import (LOADERS, Written, choose_layout, declared_kept, exclusion_keys, kept_from_dynamic,
                                  readers, skip_pattern)


@pytest.mark.parametrize("bits, sym, act_order, group, layout", [
    (4, False, False, 128, "awq"),      # every loader in the table
    (4, False, False, 64, "awq"),       # all but LMDeploy (group 128 only)
    (4, True, False, 128, "gptq"),      # v1: LMDeploy reads it, v2 it misreads
    (4, True, True, 128, "gptq"),
    (3, False, False, 128, "gptq_v2"),  # asymmetric v1 is refused by GPTQModel
    (8, False, False, 128, "gptq_v2"),
    (4, False, True, 128, "gptq_v2"),
])
def test_any_writes_the_layout_most_loaders_read(bits, sym, act_order, group, layout):
    assert choose_layout(bits, sym, act_order, group) == layout
    n = sum(why is None for why in readers(Written(layout, bits, sym, act_order, group)).values())
    for other in ("awq", "gptq", "gptq_v2"):
        from quant.formats import get_format

        if other != layout and get_format(other).settings_error(bits, sym, act_order) is None:
            assert sum(why is None for why in readers(Written(other, bits, sym, act_order, group)).values()) <= n


@pytest.mark.parametrize("start, change, layout", [
    ({"bits": 8}, {"bits": 4}, "awq"),
    ({"bits": 3}, {"bits": 4}, "awq"),
    ({}, {"sym": True}, "gptq"),
    ({"method": "gptq"}, {"gptq": "act-order"}, "gptq_v2"),
    ({"target": "vllm", "sym": True}, {"sym": False, "target": "lmdeploy"}, "awq"),
])
def test_a_changed_config_picks_its_layout_again(tmp_path, start, change, layout):
    """A config's picked layout was kept by with_ and replace as if asked for: bits 8 -> 4 wrote GPTQ v2 (which
    vLLM and LMDeploy misread) where the CLI's --bits 4 writes AWQ gemm; sym=True was refused as --format awq."""
    import dataclasses

    from quant import GPTQOptions, QuantConfig
    if change.get("gptq") == "act-order":
        change = {"gptq": GPTQOptions(act_order=True)}
    cfg = QuantConfig(**start)
    assert cfg.with_(**change).layout == dataclasses.replace(cfg, **change).layout == layout
    if start == {"bits": 8}:
        assert QuantConfig(bits=8, fmt="gptq").with_(**change).layout == "gptq"  # a layout asked for is kept
        # and through quantize(), as the CLI writes it
        import quant
        src = save_tiny_model("llama", tmp_path / "src")
        report = quant.quantize(src, tmp_path / "out", cfg, bits=4, group_size=32, progress=False)
        qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
        assert report.fmt == "awq" and qc["quant_method"] == "awq"


def test_asymmetric_gptq_v1_is_refused_by_gptqmodel_alone():
    why = readers(Written("gptq", 4, False, False, 128))
    assert why["gptqmodel"] and why["transformers"] is None  # optimum converts v1 zero points itself
    assert readers(Written("gptq_v2", 4, False, False, 128))["gptqmodel"] is None
    assert "one step off" in readers(Written("gptq_v2", 4, True, False, 128))["lmdeploy"]


@pytest.mark.parametrize("args, fragment", [
    (["--format", "gptq_v2", "--sym"], "v2 zero points as v1"),
    (["--act-order", "--sym"], "act-order"),
    (["--bits", "3", "--sym"], "not 3-bit"),
    (["--bits", "8", "--sym"], "not 8-bit"),
    (["--group-size", "64"], "group size 128 only"),
])
def test_target_lmdeploy_refuses_what_turbomind_misreads(tmp_path, capsys, args, fragment):
    src = save_tiny_model("llama", tmp_path / "src")
    code, err = run_cli(["gptq", src, "-o", tmp_path / "out", "--target", "lmdeploy", "--n-samples", "2",
                         "--seqlen", "16", *args], capsys)
    assert_refused(code, err, "--target lmdeploy", "LMDeploy TurboMind", fragment)
    assert not [p for p in tmp_path.iterdir() if p.name != "src"]


def test_target_vllm_refuses_part_of_a_fused_group_kept_before_any_work(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src")
    code, err = run_cli(["rtn", src, "-o", tmp_path / "out", "--target", "vllm", "--skip", "self_attn.v_proj",
                         "--group-size", "32"], capsys)
    assert_refused(code, err, "--target vllm", "fused group")
    assert not [p for p in tmp_path.iterdir() if p.name != "src"]


def test_target_picks_a_layout_its_loader_reads(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src")
    for target, layout in (("transformers", "gptq_v2"), ("any", "gptq_v2")):
        out = tmp_path / f"out-{target}"
        code, _ = run_cli(["rtn", src, "-o", out, "--bits", "8", "--group-size", "32", "--target", target], capsys)
        assert code == 0
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert (qc["quant_method"], qc["checkpoint_format"], qc["sym"]) == ("gptq", layout, False)
    code, err = run_cli(["rtn", src, "-o", tmp_path / "out-vllm", "--bits", "8", "--group-size", "32", "--target",
                         "vllm"], capsys)
    assert_refused(code, err, "--target vllm", "asymmetric")
    import quant  # `qtool rtn` has no --sym; the API decides the layout the same way

    quant.quantize(src, tmp_path / "out-vllm", method="rtn", bits=8, sym=True, group_size=32, target="vllm",
                   progress=False)
    qc = json.loads((tmp_path / "out-vllm" / "config.json").read_text())["quantization_config"]
    assert (qc["checkpoint_format"], qc["sym"]) == ("gptq", True)
    with pytest.raises(QtoolError, match="--target vllm"):
        quant.quantize(src, tmp_path / "x", method="rtn", bits=3, group_size=32, target="vllm", progress=False)


def test_kept_layers_are_written_for_every_loader(tmp_path, capsys):
    """One layer kept: its exact name in modules_to_not_convert (AWQ loaders), a negative `dynamic` rule
    (GPTQModel, vLLM's GPTQ path) and, for GPTQ, the quantized names in modules_in_block_to_quantize
    (transformers through optimum); a layer kept in every block is written once, block-relative (AutoAWQ)."""
    src = save_tiny_model("llama", tmp_path / "src")
    one = "model.layers.1.mlp.down_proj"
    assert run_cli(["rtn", src, "-o", tmp_path / "awq", "--group-size", "32", "--skip", one], capsys)[0] == 0
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == [one]
    assert kept_from_dynamic(qc["dynamic"]) == [one] and "modules_in_block_to_quantize" not in qc
    code, out, _ = (lambda r: (r[0], r[2], r[1]))(run_cli_out(["info", tmp_path / "awq"], capsys))
    assert code == 0 and "AutoAWQ 0.2.9" in out and "only some blocks" in out  # AutoAWQ cannot keep one layer
    assert "read right by" in out and "GPTQModel 7.6" in out.split("read right by")[1].splitlines()[0]

    import quant

    quant.quantize(src, tmp_path / "gptq", method="rtn", bits=4, sym=True, group_size=32, skip=("mlp.down_proj",),
                   progress=False)
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["mlp.down_proj"]  # kept in every block
    kept = kept_from_dynamic(qc["dynamic"])
    assert kept and all(n.endswith(".mlp.down_proj") for n in kept)
    quantized = qc["modules_in_block_to_quantize"][0]
    assert quantized and not set(quantized) & set(kept) and any(n.endswith("mlp.up_proj") for n in quantized)
    assert (tmp_path / "gptq" / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert all(f"{n}.weight" in names and f"{n}.qweight" not in names for n in kept)
    assert all(f"{n}.qweight" in names for n in quantized)


def test_skip_patterns():
    q = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    assert skip_pattern([], q) == set()
    assert skip_pattern(["model.layers.0.self_attn.v_proj"], q) == {"partial", "some"}
    assert skip_pattern(["model.layers.0.mlp.down_proj"], q) == {"some"}
    assert skip_pattern(["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"],
                        ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]) == {"some"}
    assert skip_pattern(["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"], q[:2]) == {"uniform"}
    # One block's down_proj and every block's q_proj kept: a group split in every block, and the blocks differ,
    # so the AWQ reader that takes both (fused groups, block-relative names) misreads block 0's down_proj.
    q = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")]
    both = skip_pattern(["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                         "model.layers.1.self_attn.q_proj"], [*q, "model.layers.1.mlp.down_proj"])
    assert both == {"partial", "some"}
    assert "only some blocks" in readers(Written("awq", 4, False, False, 128, both))["autoawq"]
    # A block-relative name is written only where no quantized name contains it (vLLM matches by substring).
    keys = exclusion_keys("awq", ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
                          ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj"])
    assert keys["modules_to_not_convert"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert set(LOADERS) == {"transformers", "gptqmodel", "vllm", "lmdeploy", "autoawq"}


def _overflowing_model(tmp_path, name: str):
    """A tiny float32 Llama whose linear ``name`` in block 1 has a weight whose group scale overflows float16: the
    pipeline keeps that layer in full precision when it loads the block."""
    from safetensors.torch import load_file, save_file

    src = save_tiny_model("llama", tmp_path / "src")
    weights = load_file(str(src / "model.safetensors"))
    weights[f"model.layers.1.{name}.weight"][0, 0] = 1e6
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def test_a_layer_kept_while_quantizing_is_in_every_exclusion_key(tmp_path, capsys):
    src = _overflowing_model(tmp_path, "mlp.down_proj")
    code, err, _ = run_cli_out(["rtn", src, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert code == 0, err
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["model.layers.1.mlp.down_proj"]
    assert kept_from_dynamic(qc["dynamic"]) == ["model.layers.1.mlp.down_proj"]
    from quant.info import checkpoint_info

    info = checkpoint_info(tmp_path / "out")
    assert info.skipped == ["model.layers.1.mlp.down_proj"]
    assert info.loaders["autoawq"] and "only some blocks" in info.loaders["autoawq"]


def test_a_target_refuses_a_layer_kept_while_quantizing_that_it_would_misread(tmp_path, capsys):
    src = _overflowing_model(tmp_path, "self_attn.q_proj")  # k and v stay quantized: vLLM fuses q/k/v
    code, err = run_cli(["rtn", src, "-o", tmp_path / "out", "--group-size", "32", "--target", "vllm"], capsys)
    assert_refused(code, err, "--target vllm", "fused group")
    assert not (tmp_path / "out").exists()


def test_info_reads_kept_layers_from_the_keys_present(tmp_path, capsys):
    import quant
    from quant.info import checkpoint_info

    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "gptq"
    quant.quantize(src, out, method="rtn", sym=True, group_size=32, skip=("mlp.down_proj",), progress=False)
    assert checkpoint_info(out).loaders["gptqmodel"] is None
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    qc = config["quantization_config"]
    del qc["dynamic"], qc["modules_in_block_to_quantize"]  # as another tool might write it
    config_path.write_text(json.dumps(config))
    info = checkpoint_info(out)
    assert len(info.skipped) == 2  # both blocks' down_proj, from modules_to_not_convert
    assert "dynamic" in info.loaders["gptqmodel"] and "modules_in_block_to_quantize" in info.loaders["transformers"]
    qc["modules_to_not_convert"] = None
    qc["dynamic"] = {r"-:.*\.mlp\.down_proj": {}}  # a GPTQModel pattern rule
    config_path.write_text(json.dumps(config))
    info = checkpoint_info(out)
    assert len(info.skipped) == 2 and info.loaders["gptqmodel"] is None and info.loaders["transformers"]
    qc["dynamic"] = None  # kept in every block, declared nowhere: info saw no kept layer and vouched for every loader
    config_path.write_text(json.dumps(config))
    info = checkpoint_info(out)
    assert len(info.skipped) == 2 and all(why for why in info.loaders.values()), info.loaders


def test_info_vouches_for_no_loader_where_the_head_is_stored_quantized(tmp_path):
    """Another tool's quantized lm_head: qtool reads it, but transformers' AWQ loader keeps lm_head in full precision
    (a random head) and optimum's GPTQ converts the blocks only; info listed every loader as reading it right."""
    import torch
    from safetensors.torch import load_file, save_file

    import quant
    from quant import qmath
    from quant.formats import PackedWeight, pack_awq_gemm
    from quant.info import checkpoint_info

    src = save_tiny_model("llama", tmp_path / "src")  # untied: a head of its own
    out = tmp_path / "q"
    quant.quantize(src, out, method="rtn", group_size=32, progress=False)
    assert checkpoint_info(out).loaders["transformers"] is None
    tensors = load_file(str(out / "model.safetensors"))
    w = tensors.pop("lm_head.weight").float()
    scale, zero = qmath.compute_qparams(w, 4, 32, False)
    packed = pack_awq_gemm(PackedWeight(qmath.quantize(w, scale, zero, 4, 32), scale.half(), zero, 4, 32))
    save_file({**tensors, **{f"lm_head.{k}": v for k, v in packed.items()}}, str(out / "model.safetensors"))
    assert sum(isinstance(m, quant.modules.QuantLinear) for m in quant.load(out).modules()) == 15  # qtool reads it
    loaders = checkpoint_info(out).loaders
    assert all(loaders.values()) and "lm_head is stored quantized" in loaders["transformers"], loaders


@pytest.mark.parametrize("value", [None, "abc", True, 1.5])
def test_info_refuses_a_malformed_group_size_in_one_sentence(tmp_path, capsys, value):
    import quant

    src = save_tiny_model("llama", tmp_path / "src")
    quant.quantize(src, tmp_path / "q", method="rtn", group_size=32, progress=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["group_size"] = value
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["info", tmp_path / "q"], capsys)
    assert_refused(code, err, "quantization_config.group_size", "integer")


@pytest.mark.parametrize("field, value, fragment", [
    ("quantization_config", "awq", "not an object"),
    ("modules_to_not_convert", "mlp.down_proj", "list of module names"),
    ("group_size", 64, "group size 64 with the layer sizes make it"),  # the tensors hold group 32
])
def test_info_refuses_other_malformed_configs(tmp_path, capsys, field, value, fragment):
    import quant

    src = save_tiny_model("llama", tmp_path / "src")
    quant.quantize(src, tmp_path / "q", method="rtn", group_size=32, progress=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    if field == "quantization_config":
        config[field] = value
    else:
        config["quantization_config"][field] = value
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["info", tmp_path / "q"], capsys)
    assert_refused(code, err, fragment)


def test_the_table_covers_moe_checkpoints_and_int4_cpu_group_sizes():
    moe = readers(Written("awq", 4, False, False, 128, moe=True))
    assert moe["vllm"] is None and "randomly initialised" in moe["transformers"] and moe["gptqmodel"]
    g16 = readers(Written("awq", 4, False, False, 16))
    assert "not 16" in g16["transformers"] and "not 16" in g16["gptqmodel"]
    assert readers(Written("gptq_v2", 3, False, False, 16))["gptqmodel"] is None
    # InternLM2 and Mixtral name gate/up w1/w3; a MoE layer's experts are one fused tensor in vLLM.
    q = ["model.layers.0.feed_forward.w3", "model.layers.0.feed_forward.w2"]
    assert skip_pattern(["model.layers.0.feed_forward.w1"], q) == {"partial", "uniform"}
    experts = [f"model.layers.0.mlp.experts.{e}.{p}" for e in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert skip_pattern(experts[3:], experts[:3]) == {"partial", "uniform"}
    assert skip_pattern(experts, ["model.layers.0.self_attn.q_proj"]) == {"uniform"}


def test_declared_kept_follows_each_loaders_matching():
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    got = declared_kept({"modules_to_not_convert": ["mlp.down_proj"],
                         "dynamic": {r"+:.*\.layers\.0\..*": {"bits": 8}, r"-:.*down_proj": {}},
                         "modules_in_block_to_quantize": [["mlp.up_proj"]]}, names)
    assert got["modules_to_not_convert"] == {names[0], names[2]}
    assert got["dynamic"] == {names[2]}  # the first matching rule decides: block 0's positive rule comes first
    assert got["modules_in_block_to_quantize"] == {names[0], names[2]}


def test_every_method_takes_sym_and_a_target_hint_names_it(tmp_path, capsys):
    src = save_tiny_model("llama", tmp_path / "src")
    code, err = run_cli(["rtn", src, "-o", tmp_path / "a", "--bits", "8", "--target", "vllm"], capsys)
    assert_refused(code, err, "only symmetric", "pass --sym")
    code, err = run_cli(["rtn", src, "-o", tmp_path / "b", "--bits", "8", "--sym", "--target", "vllm",
                         "--group-size", "32"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["sym"] is True
    # where --sym would be refused too, the hint is not given (it was: LMDeploy reads group size 128 only)
    code, err = run_cli(["rtn", src, "-o", tmp_path / "c", "--group-size", "64", "--target", "lmdeploy"], capsys)
    assert_refused(code, err, "only symmetric", "group size 128 only")
    assert "--sym" not in err
