"""GPTQ: the solver against RTN and a direct OBQ reference, its edge cases, and the method end to end."""
import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import MODEL_TYPES, save_tiny_model

from quant.config import SEARCH_FILE
import quant
from calib.hessian import Hessian
from cli.main import app
from quant.gptq import block as gptq_module
from quant import qmath
from quant.config import GPTQOptions, QuantConfig
from quant.errors import QtoolError
from quant.formats import pack_gptq, unpack_gptq
from quant.gptq import gptq_quantize, hessian_error, inverse_hessian_cholesky
from quant.gptq.solver import searched_range
from quant.layers import rtn_packed
from quant.modules import QuantLinear


def _cfg(bits=4, group_size=16, sym=True, **gptq):
    fmt = "gptq" if bits != 4 or sym or gptq.get("act_order") else None
    return QuantConfig(method="gptq", bits=bits, group_size=group_size, sym=sym, fmt=fmt, gptq=GPTQOptions(**gptq))


def _problem(out_f=24, in_f=64, seed=0, dtype=torch.float32):
    """A random weight and the Hessian of correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    mix = torch.randn(in_f, in_f, generator=g, dtype=dtype) / in_f**0.5
    X = (torch.randn(4 * in_f, in_f, generator=g, dtype=dtype) @ mix) * torch.rand(in_f, generator=g, dtype=dtype) * 3
    return W, X.t() @ X / X.shape[0]


def obq_reference(W, H, cfg, grid=torch.linspace(1.0, 0.5, 21)):
    """GPTQ the slow way: one column at a time with the explicit inverse of the remaining Hessian.

    After column j is rounded, its error is spread over the columns still free with
    the OBS update, and j is eliminated from ``H⁻¹`` (Gaussian elimination).
    Natural or act-order column order, groups set when the solver reaches them (their range
    searched by brute force over ``grid`` when ``cfg.gptq.range_search`` asks for it); the
    Hessian shrunk toward its diagonal by ``cfg.gptq.shrink`` first.
    """
    W, H = W.double().clone(), H.double().clone()
    in_f = W.shape[1]
    g = qmath.effective_group_size(in_f, cfg.group_size)
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if cfg.gptq.act_order else torch.arange(in_f)
    W, H = W[:, order], H[order][:, order]
    H = (1 - cfg.gptq.shrink) * H + cfg.gptq.shrink * torch.diag(torch.diagonal(H))
    d = torch.diagonal(H).clone()
    Hinv = torch.linalg.inv(H + cfg.gptq.damp * torch.diagonal(H).mean() * torch.eye(in_f, dtype=H.dtype))
    Q = torch.zeros(W.shape, dtype=torch.int32)
    for j in range(in_f):
        if j % g == 0:
            clip = None
            if cfg.gptq.range_search != "minmax":
                rows = []
                for r in range(W.shape[0]):
                    errs = []
                    for c in grid.tolist():
                        wr = W[r:r + 1, j:j + g].float()
                        s, z = qmath.compute_qparams(wr, cfg.bits, -1, cfg.sym, torch.tensor([[c]]), cfg.min_zero)
                        e = (qmath.dequantize(qmath.quantize(wr, s, z, cfg.bits, -1), s, z, -1) - wr).abs()
                        errs.append(float((e.square() * d[j:j + g]).sum() if cfg.gptq.range_search == "hessian"
                                          else e.pow(2.4).sum()))
                    rows.append(grid[errs.index(min(errs))])
                clip = torch.stack(rows)[:, None]
            s, z = qmath.compute_qparams(W[:, j:j + g], cfg.bits, -1, cfg.sym, clip, cfg.min_zero)
        Q[:, j:j + 1] = qmath.quantize(W[:, j:j + 1], s, z, cfg.bits, -1)
        err = (W[:, j] - qmath.dequantize(Q[:, j:j + 1], s, z, -1, dtype=W.dtype)[:, 0]) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q[:, torch.argsort(order)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [5, 16, 128])
@pytest.mark.parametrize("range_search", ["minmax", "hessian", "mse"])
def test_solver_matches_one_column_at_a_time_obq(act_order, block_size, range_search):
    # Block 5 puts group starts mid-block and groups across blocks; 128 is one block.
    W, H = _problem(6, 48, seed=1, dtype=torch.float64)
    cfg = _cfg(bits=3, group_size=16, sym=False, act_order=act_order, block_size=block_size, range_search=range_search)
    got = gptq_quantize(W, H, cfg).packed
    assert torch.equal(got.q, obq_reference(W, H, cfg))
    if range_search != "minmax":  # the search did shrink some groups' ranges
        minmax = gptq_quantize(W, H, _cfg(bits=3, group_size=16, sym=False, act_order=act_order,
                                          block_size=block_size, range_search="minmax")).packed
        assert not torch.equal(got.scale, minmax.scale)


@pytest.mark.parametrize("sym", [True, False])
def test_range_search_keeps_the_range_whose_rounding_errs_least_where_the_hessian_weighs(sym):
    """Rows with two outlier columns (+1, -1): where the Hessian weighs the outliers, their range is kept (clipping
    them costs most); where it weighs the other columns, the range shrinks so that those are rounded finer."""
    g = torch.Generator().manual_seed(0)
    Wg = torch.randn(8, 16, generator=g).clamp(-2, 2) * 0.1
    Wg[:, 3], Wg[:, 7] = 1.0, -1.0
    cfg = _cfg(4, 16, sym, range_search="hessian")
    outliers = torch.zeros(16, dtype=torch.bool)
    outliers[[3, 7]] = True
    on_outliers = torch.where(outliers, 1.0, 1e-3)
    elsewhere = torch.where(outliers, 1e-3, 1.0)
    kept, shrunk = searched_range(Wg, cfg, on_outliers), searched_range(Wg, cfg, elsewhere)
    assert (kept >= 0.95).all() and (shrunk <= 0.7).all()

    def err(clip, weight):
        s, z = qmath.compute_qparams(Wg, cfg.bits, -1, cfg.sym, clip, cfg.min_zero)
        return ((qmath.dequantize(qmath.quantize(Wg, s, z, cfg.bits, -1), s, z, -1) - Wg).square() * weight).sum(1)

    assert (err(shrunk, elsewhere) < err(torch.ones(8, 1), elsewhere)).all()
    assert (err(kept, on_outliers) < err(shrunk, on_outliers)).all()


@pytest.mark.parametrize("range_search", ["hessian", "mse"])
def test_static_groups_search_the_natural_groups_ranges(range_search):
    W, H = _problem(seed=2)
    cfg = _cfg(4, 16, False, act_order=True, static_groups=True, range_search=range_search)
    pw = gptq_quantize(W, H, cfg).packed
    d = torch.diagonal(H)  # shrinkage leaves the diagonal as it is
    clip = torch.cat([searched_range(W[:, c:c + 16], cfg, d[c:c + 16]) for c in range(0, 64, 16)], dim=1)
    assert (clip < 1).any()
    s, z = qmath.compute_qparams(W, 4, 16, False, clip, cfg.min_zero)
    assert torch.equal(pw.scale, s) and torch.equal(pw.zero, z)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("opts", [{}, {"act_order": True}, {"act_order": True, "static_groups": True},
                                  {"block_size": 16}])
def test_hessian_weighted_error_is_below_rtn(bits, sym, opts):
    W, H = _problem(seed=bits)
    cfg = _cfg(bits, 16, sym, **opts)
    res = gptq_quantize(W, H, cfg)
    assert res.fallback is None and res.damp == cfg.gptq.damp
    gptq_err = hessian_error(W, res.packed.dequantize(), H)
    rtn_err = hessian_error(W, rtn_packed(W, cfg).dequantize(), H)
    assert gptq_err < rtn_err
    assert int(res.packed.q.min()) >= 0 and int(res.packed.q.max()) < 2**bits


@pytest.mark.parametrize("group_size", [16, 32, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_identity_hessian_gives_exactly_rtn(group_size, sym, bits):
    W, _ = _problem(seed=3)
    cfg = _cfg(bits, group_size, sym, block_size=24, range_search="minmax")  # RTN's grid: min/max
    got = gptq_quantize(W, torch.eye(W.shape[1]), cfg).packed
    want = rtn_packed(W, cfg)
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)
    assert got.g_idx is None


@pytest.mark.parametrize("sym", [True, False])
def test_hessian_shrinkage_runs_from_the_papers_gptq_to_rtn(sym):
    # shrink 1 keeps only diag(H): no error feedback between columns, so exactly RTN's codes and
    # parameters; shrink 0 is the paper's solve on the full, correlated Hessian, which is not RTN.
    W, H = _problem(seed=5)
    want = rtn_packed(W, _cfg(4, 16, sym))
    full = gptq_quantize(W, H, _cfg(4, 16, sym, shrink=1.0, range_search="minmax")).packed
    assert torch.equal(full.q, want.q) and torch.equal(full.scale, want.scale) and torch.equal(full.zero, want.zero)
    errors = []
    for shrink in (0.0, 0.3):
        got = gptq_quantize(W, H, _cfg(4, 16, sym, shrink=shrink, range_search="minmax")).packed
        assert not torch.equal(got.q, want.q)
        errors.append(hessian_error(W, got.dequantize(), H))
    # On the Hessian it was fitted to, the unshrunk solve is the better one: shrinkage trades that for text unlike it.
    assert errors[0] < errors[1] < hessian_error(W, want.dequantize(), H)


def test_codes_use_the_stored_float16_scales():
    W, H = _problem(seed=4)
    pw = gptq_quantize(W * 1e-3, H, _cfg(4, 16, sym=False)).packed
    assert torch.equal(pw.scale, pw.scale.half().float())
    layer = QuantLinear.from_packed(pw, None, "gptq")
    assert torch.equal(layer.packed_weight().dequantize(), pw.dequantize())


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_g_idx(static_groups):
    W, H = _problem(seed=5)
    cfg = _cfg(4, 16, True, act_order=True, static_groups=static_groups)
    pw = gptq_quantize(W, H, cfg).packed
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    if static_groups:
        assert pw.g_idx is None  # static groups keep the natural group of every column
        return
    # The 16 columns with the largest H[i, i] form group 0, the next 16 group 1, ...
    assert torch.equal(pw.g_idx[order].long(), torch.arange(64) // 16)
    assert torch.bincount(pw.g_idx.long()).tolist() == [16] * 4
    t = pack_gptq(pw, "gptq")
    assert torch.equal(t["g_idx"], pw.g_idx)
    back = unpack_gptq(t, 4, 16, "gptq")
    assert torch.equal(back.g_idx, pw.g_idx) and torch.equal(back.dequantize(), pw.dequantize())


def test_dead_inputs_get_zero_weight():
    W, H = _problem(seed=6)
    dead = torch.tensor([0, 5, 17, 63])
    H[dead, :] = 0
    H[:, dead] = 0
    for cfg in (_cfg(4, 16, True), _cfg(4, 16, False, act_order=True)):
        res = gptq_quantize(W, H, cfg)
        assert res.fallback is None
        assert (res.packed.dequantize()[:, dead] == 0).all()
        assert torch.isfinite(res.packed.dequantize()).all()


def test_damping_escalates_when_cholesky_fails():
    W, H = _problem(seed=7)
    evals, evecs = torch.linalg.eigh(H)
    evals[0] = -0.05 * torch.diagonal(H).mean()  # indefinite: damp 0.01 cannot fix it
    H = (evecs * evals) @ evecs.t()
    U, damp = inverse_hessian_cholesky(H, 0.01)
    assert U is not None and 0.05 < damp <= 1.0
    res = gptq_quantize(W, H, _cfg(shrink=0.0))  # shrinkage adds to the diagonal too: the damping alone here
    assert res.fallback is None and res.damp == damp


def test_falls_back_to_rtn_with_a_log_when_the_hessian_is_unusable(caplog):
    W, H = _problem(seed=8)
    H[3, 4] = float("nan")
    cfg = _cfg()
    res = gptq_quantize(W, H, cfg)
    assert res.fallback and res.damp is None
    assert torch.equal(res.packed.q, rtn_packed(W, cfg).q)
    H = -torch.eye(64)  # negative definite: no damping up to 1.0 helps
    assert gptq_quantize(W, H, cfg).fallback == "Cholesky failed at every damping"


def test_hessian_accumulates_xtx_in_float32():
    h = Hessian.empty(8)
    x = torch.randn(3, 5, 8, dtype=torch.float16)
    h.add(x[:2])
    h.add(x[2:])
    flat = x.reshape(-1, 8).float()
    assert h.n_tokens == 15 and h.xtx.dtype == torch.float32
    assert torch.allclose(h.mean, flat.t() @ flat / 15)


# --- the method in the pipeline ------------------------------------------------------------------


def _ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("gptq") / "src")


@pytest.mark.parametrize("opts", [
    dict(sym=True),
    dict(sym=False, fmt="gptq_v2", gptq=GPTQOptions(act_order=True)),
    dict(sym=False, fmt="awq", gptq=GPTQOptions(true_sequential=False, value_hessian=False)),
])
def test_gptq_checkpoint_reloads_and_beats_rtn(tmp_path, tiny_src, opts):
    # held_out=0: this tests the solver; on a tiny random model the guards' loss comparison is noise.
    kw = dict(method="gptq", bits=3 if opts.get("fmt", "").startswith("gptq") else 4, group_size=32, n_samples=8, seqlen=64,
              dtype="float32", progress=False, held_out=0)
    if opts.get("fmt") == "awq":
        kw["bits"] = 4
    report = quant.quantize(tiny_src, tmp_path / "gptq", **kw, **opts)
    quant.quantize(tiny_src, tmp_path / "rtn", **{**kw, **opts, "method": "rtn", "gptq": GPTQOptions()})
    assert report.fmt == opts.get("fmt", "gptq")
    assert all({"hessian s", "solve s", "rel err"} <= set(b.info) for b in report.blocks)
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    if report.fmt.startswith("gptq"):
        assert qc["desc_act"] == ("gptq" in opts and opts["gptq"].act_order)
        assert qc["checkpoint_format"] == report.fmt and qc["sym"] == opts["sym"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib.data import calibration_batch, default_corpus

    # Held-out windows of the calibration corpus (another seed): the distribution GPTQ fitted.
    ids = calibration_batch(AutoTokenizer.from_pretrained(tiny_src), default_corpus(), 8, 64, seed=99)
    fp = AutoModelForCausalLM.from_pretrained(tiny_src, dtype=torch.float32)(ids).logits
    errs = {}
    for name in ("gptq", "rtn"):
        model = quant.load(tmp_path / name, dtype=torch.float32)
        errs[name] = (model(ids).logits - fp).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"], errs


def test_true_sequential_sees_quantized_earlier_layers(tiny_src, monkeypatch):
    """With true-sequential the o_proj Hessian comes from a block whose q/k/v are already quantized."""
    import calib.hessian as hessian_mod

    seen = []
    real = hessian_mod.collect_hessians

    def spy(block, inputs, groups, stop_early=True):
        # Quantized (w4, group 32): at most 16 distinct values in each row's first group.
        w = block.get_submodule("self_attn.q_proj").weight[:, :32]
        seen.append((groups, max(len(torch.unique(row)) for row in w) <= 16))
        return real(block, inputs, groups, stop_early)

    monkeypatch.setattr("quant.gptq.block.collect_hessians", spy)
    quant.quantize(tiny_src, tiny_src.parent / "seq", method="gptq", bits=4, group_size=32, n_samples=4, seqlen=32,
                   progress=False, overwrite=True)
    first_block = seen[:4]
    assert [g for g, _ in first_block] == [[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")],
                                          [("self_attn.o_proj",)], [("mlp.gate_proj", "mlp.up_proj")],
                                          [("mlp.down_proj",)]]
    assert [packed for _, packed in first_block] == [False, True, True, True]


def test_cli_end_to_end_and_bad_input(tmp_path, tiny_src):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["gptq", str(tiny_src), "-o", str(out), "--bits", "4", "--group-size", "32",
                                   "--act-order", "--n-samples", "4", "--seqlen", "32", "-v"])
    assert res.exit_code == 0, res.output
    assert "solve s" in res.output and "linears quantized" in res.output
    model = quant.load(out, dtype=torch.float32)
    assert model(_ids()).logits.isfinite().all()
    assert json.loads((out / "qtool.json").read_text())["qtool"]["config"]["gptq"]["value_hessian"] is True
    res = CliRunner().invoke(app, ["gptq", str(tiny_src), "-o", str(tmp_path / "xtx"), "--group-size", "32",
                                   "--no-value-hessian", "--range-search", "mse", "--n-samples", "4", "--seqlen", "32"])
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "xtx" / "qtool.json").read_text())["qtool"]["config"]["gptq"]
    assert settings["value_hessian"] is False and settings["range_search"] == "mse"
    res = CliRunner().invoke(app, ["gptq", str(tiny_src), "-o", str(tmp_path / "bad"), "--range-search", "l2"])
    assert res.exit_code == 2 and "'l2' is not one of 'minmax', 'hessian', 'mse'" in res.output
    bad = [
        (["--bits", "5"], "--bits 5"),
        (["--damp", "0"], "--damp"),
        (["--shrink", "1.5"], "--shrink 1.5 is out of range"),
        (["--static-groups"], "--static-groups only changes --act-order runs"),
        (["--act-order", "--asym", "--format", "awq"], "cannot hold act-order weights (use --format gptq)"),
        (["--group-size", "48"], "--group-size 48"),
    ]
    for args, msg in bad:
        # ``qtool``'s entry point turns a QtoolError into one line on stderr and exit status 2.
        res = CliRunner().invoke(app, ["gptq", str(tiny_src), "-o", str(tmp_path / "bad")] + args)
        assert isinstance(res.exception, QtoolError) and msg in str(res.exception), (args, res.exception)
    assert not (tmp_path / "bad").exists()


def test_cli_and_api_defaults_give_the_same_checkpoint(tmp_path, tiny_src):
    # One set of defaults: asymmetric 4-bit GPTQ with a shrunk Hessian, written in the AWQ gemm layout.
    from safetensors.torch import load_file

    calib = ["--n-samples", "4", "--seqlen", "32", "--group-size", "32"]
    res = CliRunner().invoke(app, ["gptq", str(tiny_src), "-o", str(tmp_path / "cli")] + calib)
    assert res.exit_code == 0, res.output
    quant.quantize(tiny_src, tmp_path / "api", method="gptq", n_samples=4, seqlen=32, group_size=32, progress=False)
    cli, api = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cli", "api"))
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)
    config = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["zero_point"] is True
    settings = json.loads((tmp_path / "cli" / "qtool.json").read_text())["qtool"]["config"]
    assert settings["sym"] is False and settings["gptq"]["shrink"] == GPTQOptions().shrink > 0


def test_clip_bounds_the_groups_and_needs_natural_groups():
    W, H = _problem(seed=9)
    clip = torch.full((W.shape[0], 4), 0.5)
    cfg = _cfg(4, 16, True)
    pw = gptq_quantize(W, torch.eye(64), cfg, clip).packed
    want = rtn_packed(W, cfg, clip)
    assert torch.equal(pw.q, want.q) and torch.equal(pw.scale, want.scale)
    with pytest.raises(ValueError, match="act-order"):
        gptq_quantize(W, H, _cfg(4, 16, True, act_order=True), clip)
    assert gptq_quantize(W, H, _cfg(4, 16, True, act_order=True, static_groups=True), clip).fallback is None


@pytest.mark.parametrize("act_order", [False, True])
def test_awq_then_gptq_folds_scales_and_saves_the_search(tmp_path, tiny_src, act_order):
    out = tmp_path / "awq_gptq"
    opts = GPTQOptions(awq_first=True, act_order=act_order)
    report = quant.quantize(tiny_src, out, method="gptq", bits=4, group_size=32, sym=False, fmt="gptq", n_samples=4,
                            seqlen=32, gptq=opts, progress=False, held_out=0)  # no guard: the search is tested here
    assert all("awq α" in b.info and "solve s" in b.info for b in report.blocks)
    from quant.info import checkpoint_info

    assert report.method == "gptq+awq" and checkpoint_info(out).method == "gptq+awq"  # the summary said "gptq"
    from safetensors import safe_open

    with safe_open(str(out / SEARCH_FILE), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.awq_scale" in keys and "model.layers.1.mlp.down_proj.awq_clip" in keys
    model = quant.load(out, dtype=torch.float32)
    assert model(_ids()).logits.isfinite().all()


def test_asymmetric_v1_keeps_zero_points_storable():
    # All-positive groups would get z = 0, which a v1 checkpoint cannot hold (its loaders add 1 unmasked).
    W, H = _problem(seed=10)
    W = W.abs() + 0.1
    v1 = QuantConfig(method="gptq", bits=4, group_size=16, sym=False, fmt="gptq")
    v2 = v1.with_(fmt="gptq_v2")
    assert gptq_quantize(W, H, v1).packed.zero.min() >= 1
    assert gptq_quantize(W, H, v2).packed.zero.min() == 0
    pack_gptq(gptq_quantize(W, H, v1).packed, "gptq")  # would raise on a zero point of 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_architecture_quantizes_with_value_hessians(tmp_path, model_type, caplog, monkeypatch):
    """GPTQ end to end on each architecture row: its value rows (phi3: inside qkv_proj) get the attention-weighted
    Hessians, the checkpoint reloads, and it is closer to the float model than round-to-nearest."""
    solved = []
    real = gptq_module.solve_value_heads
    monkeypatch.setattr(gptq_module, "solve_value_heads", lambda *a: solved.append(a[4]) or real(*a))
    src = save_tiny_model(model_type, tmp_path / "src")
    # held_out=0: the test is about the solver; on a tiny random model the guards' loss comparison is noise.
    kw = dict(bits=3, group_size=32, n_samples=8, seqlen=64, dtype="float32", progress=False, fmt="gptq", held_out=0)
    with caplog.at_level("INFO", logger="quant.gptq"):
        quant.quantize(src, tmp_path / "gptq", method="gptq", **kw)
    assert not [r.message for r in caplog.records if "plain" in r.message or "fell back" in r.message]
    # One per-head solve per block; the values start after the 4 query and 2 key heads of 16 in phi3's qkv_proj.
    assert solved == [4 * 16 + 2 * 16 if model_type == "phi3" else 0] * 2
    quant.quantize(src, tmp_path / "rtn", method="rtn", **kw)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib.data import calibration_batch, default_corpus

    ids = calibration_batch(AutoTokenizer.from_pretrained(src), default_corpus(), 8, 64, seed=99)
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    errs = {n: (quant.load(tmp_path / n, dtype=torch.float32)(ids).logits - fp).pow(2).mean().item()
            for n in ("gptq", "rtn")}
    assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_awq_gptq_takes_the_first_hessians_from_the_unscaled_block_divided_by_the_scales(model_type):
    """AWQ+GPTQ and its plain-GPTQ alternative share the q/k/v Hessians (XᵀX and the value heads'), taken once from
    the block before AWQ's scales are folded; AWQ+GPTQ's are those divided by the scales. They must be what the
    folded block itself gives."""
    from tiny_models import tiny_model

    from calib.collectors import record_block_calls
    from calib.runner import BlockInputs
    from quant.arch import ARCHITECTURES
    from quant.awq.fold import SCALE_KEY, fold_scales
    from quant.methods import BlockContext

    torch.manual_seed(0)
    model = tiny_model(model_type)
    arch = ARCHITECTURES[model_type]
    block = model.model.layers[0]
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    call = record_block_calls(model, model.model.layers, ids)[0]
    qkv = arch.sequential[0]
    ctx = BlockContext(0, block, [n for g in arch.sequential for n in g], QuantConfig(method="gptq", group_size=32),
                       arch, BlockInputs([call]))
    hessians, values = gptq_module._batch_hessians(ctx, (qkv,))
    s = torch.rand(block.input_layernorm.weight.shape[0]) * 4 + 0.1
    fold_scales(block, arch, {f"{n}.{SCALE_KEY}": s for n in qkv})
    want, want_values = gptq_module._batch_hessians(ctx, (qkv,))
    got, got_values = gptq_module._input_scaled(hessians, values, {n: s for n in qkv}, arch.v_proj)
    for n in qkv:
        torch.testing.assert_close(got[n].mean, want[n].mean, rtol=1e-4, atol=1e-6 * float(want[n].mean.abs().max()))
    assert all(got[n] is got[qkv[0]] for n in qkv) and not torch.allclose(got[qkv[0]].mean, hessians[qkv[0]].mean)
    assert values is not None and got_values[1] == want_values[1] and len(got_values[0]) == len(want_values[0]) > 0
    for g, w in zip(got_values[0], want_values[0]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * float(w.abs().max()))


def test_awq_gptq_with_its_plain_alternative_computes_the_value_hessians_once_a_block(tmp_path, monkeypatch):
    """The value heads' Hessians are the dearest of a block's (an attention pass per key/value head): AWQ+GPTQ and
    its plain-GPTQ alternative used to compute them twice a block."""
    calls = []
    real = gptq_module.collect_value_hessians
    monkeypatch.setattr(gptq_module, "collect_value_hessians", lambda *a, **k: calls.append(1) or real(*a, **k))
    src = save_tiny_model("llama", tmp_path / "src")
    report = quant.quantize(src, tmp_path / "q", method="gptq", gptq=GPTQOptions(awq_first=True), bits=4,
                            group_size=32, n_samples=4, seqlen=32, progress=False)
    assert report.guarded and len(report.blocks) == 2 and len(calls) == 2
