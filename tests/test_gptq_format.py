"""The GPTQ layout: bit-exact round trips with act-order g_idx, hand-made packings, v1/v2 on load."""
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model

import quant
from quant.config import GPTQOptions, QuantConfig
from quant.errors import QtoolError
from quant.formats import PackedWeight, pack_gptq, unpack_gptq
from quant.gptq import gptq_quantize
from quant.formats.spec import read_spec
from quant.info import checkpoint_info


def _solved(bits, sym, act_order, out_f=64, in_f=128, group_size=32):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(512, in_f, generator=g) * torch.rand(in_f, generator=g)
    cfg = QuantConfig(method="gptq", bits=bits, group_size=group_size, sym=sym, fmt="gptq",
                      gptq=GPTQOptions(act_order=act_order))
    return gptq_quantize(W, X.t() @ X / 512, cfg).packed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_solver_output_round_trips_bit_exactly(bits, sym, act_order, checkpoint_format):
    pw = _solved(bits, sym, act_order)
    t = pack_gptq(pw, checkpoint_format)
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qzeros"].shape == (4, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32
    back = unpack_gptq(t, bits, 32, checkpoint_format)
    assert torch.equal(back.q, pw.q) and torch.equal(back.zero.int(), pw.zero.int())
    assert torch.equal(back.scale.float(), pw.scale)
    assert (back.g_idx is None) == (pw.g_idx is None)
    if act_order:
        assert torch.equal(back.g_idx, pw.g_idx)
    again = pack_gptq(back, checkpoint_format)
    assert all(torch.equal(again[k], t[k]) for k in t)
    assert torch.equal(back.dequantize(), pw.dequantize())


def test_2bit_and_8bit_packing_and_zeros_by_hand():
    # 2 bits: 16 input rows per word, row r in bits 2r..2r+1; 8 bits: 4 rows per word.
    q2 = torch.tensor([r % 4 for r in range(16)], dtype=torch.int32)[None, :].expand(16, 16).contiguous()
    pw = PackedWeight(q2, torch.ones(16, 1), torch.full((16, 1), 2, dtype=torch.int32), 2, -1)
    t = pack_gptq(pw, "gptq")
    assert (t["qweight"] == torch.tensor(0xE4E4E4E4 - 2**32, dtype=torch.int32)).all()  # 0b11100100 repeated
    assert (t["qzeros"] == 0x55555555).all()  # z - 1 = 1 in each of the 16 two-bit fields
    assert (pack_gptq(pw, "gptq_v2")["qzeros"] == torch.tensor(0xAAAAAAAA - 2**32, dtype=torch.int32)).all()
    q8 = torch.tensor([1, 2, 3, 250], dtype=torch.int32)[None, :].expand(4, 4).contiguous()
    zero = torch.tensor([[128], [1], [7], [255]], dtype=torch.int32)
    t = pack_gptq(PackedWeight(q8, torch.ones(4, 1), zero, 8, -1), "gptq")
    assert (t["qweight"] == torch.tensor(0xFA030201 - 2**32, dtype=torch.int32)).all()
    assert t["qzeros"].tolist() == [[0xFE06007F - 2**32]]  # zeros - 1 = 127, 0, 6, 254 along the outputs


def test_act_order_g_idx_by_hand():
    # Four input rows in two groups of two, rows 3 and 0 quantized first: g_idx = [0, 1, 1, 0].
    g_idx = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    pw = PackedWeight(torch.tensor([[1, 2, 3, 4]] * 8, dtype=torch.int32), torch.tensor([[1.0, 2.0]] * 8),
                      torch.tensor([[1, 2]] * 8, dtype=torch.int32), 8, 2, g_idx)
    t = pack_gptq(pw, "gptq_v2")
    assert t["g_idx"].tolist() == [0, 1, 1, 0]
    assert pw.dequantize()[0].tolist() == [0.0, 0.0, 2.0, 3.0]  # (q - z[g]) * s[g]
    assert torch.equal(unpack_gptq(t, 8, 2, "gptq_v2").dequantize(), pw.dequantize())


# --- v1 / v2 when loading ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptqfmt")
    src = save_tiny_model("llama", root / "src")
    out = {}
    for name, kw in {"sym_v1": dict(sym=True), "sym_v2": dict(sym=True, fmt="gptq_v2"),
                     "asym_v2": dict(sym=False, fmt="gptq_v2")}.items():
        out[name] = root / name
        quant.quantize(src, out[name], method="rtn", bits=4, group_size=32, dtype="float32", progress=False, **kw)
    return out


def _ids():
    return torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))


def _logits(path):
    return quant.load(path, dtype=torch.float32)(_ids()).logits


def _relabel(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    for k, v in changes.items():
        if v is None:
            qc.pop(k, None)
        else:
            qc[k] = v
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("stored,label", [("sym_v1", "gptq_v2"), ("sym_v2", "gptq"), ("sym_v2", None)])
def test_a_mislabelled_symmetric_checkpoint_is_read_by_its_stored_zeros(checkpoints, tmp_path, caplog, stored, label):
    want = _logits(checkpoints[stored])
    wrong = _relabel(checkpoints[stored], tmp_path / "wrong", checkpoint_format=label)
    with caplog.at_level(logging.WARNING):
        got = _logits(wrong)
    assert torch.equal(got, want)
    assert "zero points are stored as in" in caplog.text


@pytest.mark.parametrize("stored,label", [("sym_v1", "gptq_v2"), ("sym_v2", "gptq")])
def test_info_vouches_for_no_loader_that_trusts_a_contradicted_checkpoint_format(checkpoints, tmp_path, stored, label):
    """transformers (optimum) and GPTQModel shift the zero points by the declared checkpoint_format; info listed them
    as reading a checkpoint right whose symmetric zeros contradict the declaration (qtool reads the stored ones)."""
    from quant.info import checkpoint_info

    right = checkpoint_info(checkpoints[stored]).loaders
    assert right["transformers"] is None and right["gptqmodel"] is None, right
    loaders = checkpoint_info(_relabel(checkpoints[stored], tmp_path / "wrong", checkpoint_format=label)).loaders
    for name in ("transformers", "gptqmodel"):
        assert f"declared checkpoint_format {label!r}" in (loaders[name] or ""), loaders
    assert loaders["vllm"] == right["vllm"] and loaders["lmdeploy"] == right["lmdeploy"]  # they never read the label


def test_v1_and_v2_of_the_same_weights_load_identically(checkpoints):
    assert torch.equal(_logits(checkpoints["sym_v1"]), _logits(checkpoints["sym_v2"]))


def test_symmetric_label_with_unreadable_zeros_is_refused(checkpoints, tmp_path):
    bad = _relabel(checkpoints["asym_v2"], tmp_path / "bad", sym=True)
    with pytest.raises(QtoolError, match="cannot tell which convention"):
        quant.load(bad)


def test_asymmetric_checkpoints_follow_their_declaration(checkpoints, tmp_path):
    # Not decidable from the tensors: the declaration is used, so the relabelled copy differs by one step.
    want = _logits(checkpoints["asym_v2"])
    no_sym_key = _relabel(checkpoints["asym_v2"], tmp_path / "nosym", sym=None)
    assert torch.equal(_logits(no_sym_key), want)
    relabelled = _relabel(checkpoints["asym_v2"], tmp_path / "v1", checkpoint_format="gptq")
    assert not torch.equal(_logits(relabelled), want)


def test_legacy_quantize_config_json(checkpoints, tmp_path):
    legacy = shutil.copytree(checkpoints["sym_v2"], tmp_path / "legacy")
    config = json.loads((legacy / "config.json").read_text())
    qc = config.pop("quantization_config")
    (legacy / "config.json").write_text(json.dumps(config))
    # AutoGPTQ's file: no quant_method; GPTQModel's older "format" key says v2.
    qc.pop("quant_method")
    qc["format"] = qc.pop("checkpoint_format")
    (legacy / "quantize_config.json").write_text(json.dumps(qc))
    assert torch.equal(_logits(legacy), _logits(checkpoints["sym_v2"]))


def test_other_layouts_are_refused_by_name(tmp_path):
    def spec(qc):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", **qc}}))
        return read_spec(tmp_path)

    for qc, msg in [({"is_marlin_format": True}, "Marlin"), ({"checkpoint_format": "marlin"}, "kernel-specific"),
                    ({"checkpoint_format": "gptq_v3"}, "unknown"), ({"bits": 5}, "bits=5")]:
        with pytest.raises(QtoolError, match=msg):
            spec(qc)
    plain = spec({"bits": 4})  # every key a GPTQ config may leave out takes the GPTQ tools' default
    assert (plain.format.name, plain.group_size, plain.act_order, plain.sym) == ("gptq", 128, False, None)


def test_a_checkpoint_without_g_idx_loads_with_the_sequential_order(checkpoints, tmp_path):

    bare = shutil.copytree(checkpoints["sym_v1"], tmp_path / "bare")
    for f in bare.glob("*.safetensors"):
        tensors = load_file(f)
        assert any(k.endswith(".g_idx") for k in tensors)
        save_file({k: v for k, v in tensors.items() if not k.endswith(".g_idx")}, f, metadata={"format": "pt"})
    assert torch.equal(_logits(bare), _logits(checkpoints["sym_v1"]))


def _edit_tensors(src, dst, edit, **config_changes):
    out = shutil.copytree(src, dst)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"].update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
    return out


def test_an_act_order_checkpoint_without_g_idx_is_refused(checkpoints, tmp_path):
    """With desc_act each input channel's group is only in g_idx: without it the layers were read in the sequential
    order, silently wrong (the helper measured a relative output error of 0.32)."""
    def drop(tensors):
        for k in [k for k in tensors if k.endswith(".g_idx")]:
            del tensors[k]

    bare = _edit_tensors(checkpoints["sym_v1"], tmp_path / "bare", drop, desc_act=True)
    with pytest.raises(QtoolError, match=r"lacks .*\.g_idx \(act-order: desc_act is true"):
        quant.load(bare)
    with pytest.raises(QtoolError, match="desc_act is true"):
        checkpoint_info(bare)


@pytest.mark.parametrize("value", [4, 99, -1])
def test_a_g_idx_naming_a_group_the_scales_lack_is_refused(checkpoints, tmp_path, value):
    """Past the last group: an IndexError traceback from the dequantization; negative: the last group read
    silently (Python's indexing)."""
    name = "model.layers.0.self_attn.q_proj.g_idx"

    def corrupt(tensors):
        if name in tensors:
            tensors[name] = tensors[name].clone()
            tensors[name][5] = value

    bad = _edit_tensors(checkpoints["sym_v1"], tmp_path / "bad", corrupt)
    with pytest.raises(QtoolError, match=rf"{name} holds group {value}, but the layer's scales hold groups 0 to 1"):
        quant.load(bad)
    with pytest.raises(QtoolError, match=f"holds group {value}"):
        checkpoint_info(bad)


def test_a_dynamic_rule_that_changes_bits_is_refused_by_name(checkpoints, tmp_path):
    """GPTQModel's positive dynamic rules give matching modules other bits or group sizes: qtool reads one setting
    per checkpoint, so it names the rule (it said the tensors did not match config.json). A rule that matches no
    quantized module, or repeats the checkpoint's settings, is read."""
    def with_dynamic(dynamic, name):
        return _edit_tensors(checkpoints["sym_v1"], tmp_path / name, lambda tensors: None, dynamic=dynamic)

    with pytest.raises(QtoolError, match=r"dynamic rule '\+:.\*down_proj' sets bits=8 for model.layers.0.mlp.down"):
        quant.load(with_dynamic({"+:.*down_proj": {"bits": 8}}, "a"))
    with pytest.raises(QtoolError, match="sets group_size=64 for"):
        checkpoint_info(with_dynamic({".*q_proj": {"group_size": 64, "bits": 4}}, "b"))
    for name, dynamic in (("c", {"+:.*visual.*": {"bits": 8}}), ("d", {"-:.*visual": {}, ".*q_proj": {"bits": 4}})):
        assert checkpoint_info(with_dynamic(dynamic, name)).bits == 4


def test_info_reads_the_zero_point_convention_from_the_tensors_as_load_does(checkpoints, tmp_path):
    """info trusted the declared sym and checkpoint_format: asymmetric zero points under a config without sym were
    called symmetric (and symmetric-only loaders listed as reading them), sym: true over asymmetric zero points
    was described instead of refused, and v1-stored symmetric zeros declared v2 were called v2."""
    keep = lambda tensors: None  # noqa: E731
    omitted = _edit_tensors(checkpoints["asym_v2"], tmp_path / "omitted", keep)
    config = json.loads((omitted / "config.json").read_text())
    del config["quantization_config"]["sym"]
    (omitted / "config.json").write_text(json.dumps(config))
    assert checkpoint_info(omitted).sym is False
    assert checkpoint_info(checkpoints["asym_v2"]).sym is False and checkpoint_info(checkpoints["sym_v1"]).sym
    claimed = _edit_tensors(checkpoints["asym_v2"], tmp_path / "claimed", keep, sym=True)
    with pytest.raises(QtoolError, match="says sym=True, but the stored zero points"):
        checkpoint_info(claimed)
    relabelled = _edit_tensors(checkpoints["sym_v1"], tmp_path / "relabelled", keep, checkpoint_format="gptq_v2")
    assert checkpoint_info(relabelled).fmt == "gptq"


def test_info_flags_a_permuted_g_idx_under_desc_act_false(checkpoints, tmp_path):
    """g_idx out of the sequential order while desc_act is false: qtool reads g_idx, loaders that take the order from
    desc_act do not; info listed them as reading it right."""
    name = "model.layers.1.mlp.up_proj.g_idx"
    assert all(why is None for n, why in checkpoint_info(checkpoints["sym_v1"]).loaders.items()
               if n in ("transformers", "vllm"))

    def shuffle(tensors):
        if name in tensors:
            tensors[name] = tensors[name][torch.randperm(tensors[name].numel(), generator=torch.Generator()
                                                         .manual_seed(0))].contiguous()

    permuted = _edit_tensors(checkpoints["sym_v1"], tmp_path / "perm", shuffle)
    loaders = checkpoint_info(permuted).loaders
    assert all("up_proj.g_idx is not the sequential group order" in (loaders[n] or "") for n in ("transformers", "vllm"))


def test_info_names_bits_that_do_not_fit_the_tensors(checkpoints, tmp_path, capsys):
    """8-bit tensors under bits=4: info blamed the group size with an input size it made up (512 for 256)."""
    src = save_tiny_model("llama", tmp_path / "src")
    quant.quantize(src, tmp_path / "w8", method="rtn", bits=8, group_size=32, fmt="gptq", sym=True, progress=False)
    wrong = _edit_tensors(tmp_path / "w8", tmp_path / "wrong", lambda tensors: None, bits=4)
    with pytest.raises(QtoolError, match="but quantization_config's bits=4 and group size 32 with the layer sizes"):
        checkpoint_info(wrong)


def test_layers_sharing_one_g_idx_tensor_each_write_it(tmp_path):
    from quant.checkpoint import checkpoint_tensors
    from quant.formats import PackedWeight
    from quant.modules import QuantLinear

    g = torch.Generator().manual_seed(0)
    g_idx = (torch.randperm(64, generator=g) // 32).to(torch.int32)  # act-order: one order for q/k/v
    layers = torch.nn.ModuleDict()
    for name in ("q", "k"):
        pw = PackedWeight(q=torch.randint(0, 16, (8, 64), generator=g, dtype=torch.int32),
                          scale=torch.rand(8, 2, generator=g) + 0.1, zero=torch.full((8, 2), 8, dtype=torch.int32),
                          bits=4, group_size=32, g_idx=g_idx)
        layers[name] = QuantLinear.from_packed(pw, None, "gptq")
    tensors = checkpoint_tensors(layers, torch.float16)
    assert torch.equal(tensors["q.g_idx"], g_idx) and torch.equal(tensors["k.g_idx"], g_idx)
    assert tensors["q.g_idx"].untyped_storage().data_ptr() != tensors["k.g_idx"].untyped_storage().data_ptr()


def test_info_vouches_for_no_loader_that_misses_settings_only_a_side_file_holds(checkpoints, tmp_path):
    """transformers and vLLM read config.json's quantization_config alone: a checkpoint whose settings are in
    AutoGPTQ's quantize_config.json only was listed as read right by them (they load it as a full-precision
    model), and one whose config.json leaves out checkpoint_format gptq_v2 (v1, every weight a step off, to them)."""
    from quant.info import checkpoint_info

    assert checkpoint_info(checkpoints["sym_v2"]).loaders["transformers"] is None  # as written: read right
    only = shutil.copytree(checkpoints["sym_v2"], tmp_path / "only")
    config = json.loads((only / "config.json").read_text())
    qc = config.pop("quantization_config")
    (only / "config.json").write_text(json.dumps(config))
    (only / "quantize_config.json").write_text(json.dumps(qc))
    loaders = checkpoint_info(only).loaders
    assert "config.json declares no quantization_config" in loaders["transformers"], loaders  # v2 read right, as written
    assert all(loaders[name] for name in ("vllm", "lmdeploy", "autoawq")), loaders
    assert loaders["gptqmodel"] is None  # AutoGPTQ's file is the one its successor reads

    split = shutil.copytree(checkpoints["sym_v2"], tmp_path / "split")
    config = json.loads((split / "config.json").read_text())
    fmt = config["quantization_config"].pop("checkpoint_format")
    (split / "config.json").write_text(json.dumps(config))
    (split / "quantize_config.json").write_text(json.dumps({"checkpoint_format": fmt}))
    loaders = checkpoint_info(split).loaders
    assert "declares gptq 4-bit" in loaders["transformers"] and "adds what makes it gptq_v2" in loaders["transformers"]
    assert all(loaders.values()), loaders  # GPTQModel too: which file it takes is not established

    same = shutil.copytree(checkpoints["sym_v2"], tmp_path / "same")  # a side file that says the same: GPTQModel's
    (same / "quantize_config.json").write_text(json.dumps(qc))
    assert checkpoint_info(same).loaders == checkpoint_info(checkpoints["sym_v2"]).loaders

    # config.json says it all, but GPTQModel reads quantize_config.json first, and this one says 8 bits
    other = shutil.copytree(checkpoints["sym_v2"], tmp_path / "other")
    (other / "quantize_config.json").write_text(json.dumps({**qc, "bits": 8}))
    loaders = checkpoint_info(other).loaders
    assert "it reads quantize_config.json before config.json" in loaders["gptqmodel"], loaders
    assert "declares gptq_v2 8-bit" in loaders["gptqmodel"]
    assert loaders["transformers"] is None
