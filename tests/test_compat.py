"""The compatibility table at work: the layout a target reads right, refusals before any work, the keys that
tell every loader which layers stay in full precision, and `qtool info`'s list of loaders."""
import json

import pytest
from test_bad_input import assert_refused, run_cli, run_cli_out
from tiny_models import save_tiny_model

from quant.errors import QtoolError
from quant.formats.compat import LOADERS, choose_layout, exclusion_keys, kept_from_dynamic, readers, skip_pattern


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
    n = sum(why is None for why in readers(layout, bits, sym, act_order, group).values())
    for other in ("awq", "gptq", "gptq_v2"):
        from quant.formats import get_format

        if other != layout and get_format(other).settings_error(bits, sym, act_order) is None:
            assert sum(why is None for why in readers(other, bits, sym, act_order, group).values()) <= n


def test_asymmetric_gptq_v1_is_refused_by_gptqmodel_alone():
    why = readers("gptq", 4, False, False, 128)
    assert why["gptqmodel"] and why["transformers"] is None  # optimum converts v1 zero points itself
    assert readers("gptq_v2", 4, False, False, 128)["gptqmodel"] is None
    assert "one step off" in readers("gptq_v2", 4, True, False, 128)["lmdeploy"]


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
    assert skip_pattern([], q) == ""
    assert skip_pattern(["model.layers.0.self_attn.v_proj"], q) == "partial"
    assert skip_pattern(["model.layers.0.mlp.down_proj"], q) == "some"
    assert skip_pattern(["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"],
                        ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]) == "some"
    assert skip_pattern(["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"], q[:2]) == "uniform"
    # A block-relative name is written only where no quantized name contains it (vLLM matches by substring).
    keys = exclusion_keys("awq", ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
                          ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj"])
    assert keys["modules_to_not_convert"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert set(LOADERS) == {"transformers", "gptqmodel", "vllm", "lmdeploy", "autoawq"}
