"""Choosing by what the block computes: AWQ's judge modules, clip acceptance, and the per-block RTN guard."""
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from method_rigs import OPTS, packed, wild_scales
from tiny_models import save_tiny_model, tiny_model

import quant
import quant.awq as awq_module
import quant.gptq.block as gptq_module
from calib.collectors import record_block_calls
from calib.runner import BlockInputs
from cli.main import app
from quant import qmath
from quant.arch import ARCHITECTURES
from quant.awq import search_block
from quant.awq.search import QuantSpec, search_scale
from quant.config import SEARCH_FILE, AWQOptions, QuantConfig
import quant.model_check as check_module
from quant.guard import relative_error, token_weights
from quant.methods import BlockContext



def _mlp_block_with_dead_rows(seed: int):
    """A llama block whose intermediate channels 64.. feed nothing (zero down_proj columns) but have large
    gate/up rows: the closed form over all of gate/up's rows is dominated by rows the MLP's output ignores."""
    model = tiny_model("llama")
    blk = model.model.layers[0]
    with torch.no_grad():
        blk.post_attention_layernorm.weight[[3, 17, 40]] *= 25
        blk.mlp.down_proj.weight[:, 64:] = 0
        for lin in (blk.mlp.up_proj, blk.mlp.gate_proj):
            lin.weight[64:] *= 8
            lin.weight[64:, [3, 17, 40]] *= 0.05
    ids = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(seed))
    return model, record_block_calls(model, model.model.layers, ids)[0]


def _mlp_error(block, call, gate, up) -> float:
    """The MLP's token-weighted squared output error with gate/up replaced, computed here from scratch."""
    with torch.no_grad():
        h = block.input_layernorm(call.hidden)
        kw = {k: v for k, v in call.kwargs.items() if k != "hidden_states"}
        x = call.hidden + block.self_attn(hidden_states=h, **kw)[0]
        x = block.post_attention_layernorm(x)
        down = block.mlp.down_proj.weight
        ref = (torch.nn.functional.silu(x @ block.mlp.gate_proj.weight.t()) * (x @ block.mlp.up_proj.weight.t())) @ down.t()
        out = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    return float(((out - ref).pow(2).sum(-1) * token_weights(call.hidden)).sum())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_mlp_scale_is_chosen_by_the_mlp_output_not_by_the_closed_form(seed):
    model, call = _mlp_block_with_dead_rows(seed)
    block, arch = model.model.layers[0], ARCHITECTURES["llama"]
    cfg = QuantConfig(method="awq", group_size=32, awq=AWQOptions(clip=False))
    gate, up = block.mlp.gate_proj.weight.detach().clone(), block.mlp.up_proj.weight.detach().clone()
    # The screen, recomputed from the public search: RTN plus the closed form's three best.
    with torch.no_grad():
        x = block.post_attention_layernorm(call.hidden + block.self_attn(
            hidden_states=block.input_layernorm(call.hidden),
            **{k: v for k, v in call.kwargs.items() if k != "hidden_states"})[0]).reshape(-1, 64)
    xtx = (x * token_weights(call.hidden).reshape(-1, 1)).t() @ x
    spec = QuantSpec(4, 32)
    res = search_scale(torch.cat([gate, up]), xtx, x.abs().mean(0), spec, cfg.awq.n_grid)
    errors = {}
    for i in res.screen(cfg.awq.n_judge):
        s = res.candidates[i]
        errors[float(res.ratios[i])] = _mlp_error(block, call, qmath.fake_quantize(gate * s, 4, 32) / s,
                                                  qmath.fake_quantize(up * s, 4, 32) / s)
    want = min(errors, key=lambda r: (errors[r], r))
    assert res.ratio != want, "the construction must make the closed form and the MLP output disagree"

    _, info, _ = search_block(BlockContext(0, block, list(arch.linears), cfg, arch, BlockInputs([call])))
    chosen = float(info["awq α"].split()[2])  # groups: input norm, v -> o, post-attention norm, up -> down
    assert float(info["α by proxy"].split()[2]) == pytest.approx(res.ratio)
    assert chosen == pytest.approx(want)
    assert errors[want] < errors[res.ratio]


def test_clips_are_kept_only_where_they_lower_the_held_out_error():
    model = tiny_model("llama")
    blocks, arch = model.model.layers, ARCHITECTURES["llama"]
    ids = torch.randint(3, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    search_call = record_block_calls(model, blocks, ids[:8])[0]
    accept_call = record_block_calls(model, blocks, ids[8:])[0]
    # An accept set unlike the search set: its tokens are ten times larger in four channels, where
    # a clipped range rounds worst.
    accept_call = replace(accept_call, hidden=accept_call.hidden.clone())
    accept_call.hidden[..., :4] *= 10
    cfg = QuantConfig(method="awq", group_size=32, awq=AWQOptions(n_judge=1))
    names = list(arch.linears)
    unchecked, _, _ = search_block(BlockContext(0, tiny_model("llama").model.layers[0], names, cfg, arch,
                                                BlockInputs([search_call])))
    checked, info, _ = search_block(BlockContext(0, blocks[0], names, cfg, arch,
                                                 BlockInputs([search_call], accept=[accept_call])))
    clips = [k for k in unchecked if k.endswith("awq_clip")]
    assert len(clips) == len(names)  # without held-out windows every searched clip is used
    kept = [k for k in checked if k.endswith("awq_clip")]
    assert 0 < len(kept) < len(clips), info
    assert info["clips kept"] == f"{len(kept)}/{len(names)}"
    for k in kept:  # a kept clip is the searched one
        assert torch.equal(checked[k], unchecked[k])


def test_awq_made_worse_on_purpose_falls_back_to_rtn_and_says_so(tmp_path, monkeypatch):
    src = save_tiny_model("llama", tmp_path / "src")
    rtn_report = quant.quantize(src, tmp_path / "rtn", method="rtn", **OPTS)
    assert not any(b.rtn_fallback for b in rtn_report.blocks)
    monkeypatch.setattr(awq_module, "search_scale", wild_scales(search_scale))
    awq = AWQOptions(n_judge=1, clip=False)
    unguarded = quant.quantize(src, tmp_path / "off", method="awq", awq=awq, held_out=0, **OPTS)
    assert not any(b.rtn_fallback for b in unguarded.blocks)
    assert packed(tmp_path / "off").keys() == packed(tmp_path / "rtn").keys()
    assert any(not torch.equal(v, packed(tmp_path / "rtn")[k]) for k, v in packed(tmp_path / "off").items())

    report = quant.quantize(src, tmp_path / "on", method="awq", awq=awq, **OPTS)
    assert all(b.rtn_fallback for b in report.blocks)
    assert report.model_check is None  # every candidate is the all-RTN model: nothing for the check to choose
    for b in report.blocks:
        assert b.info["kept"] == "rtn"
        assert float(b.info["held-out err"]) > float(b.info["rtn held-out err"])
    rtn = packed(tmp_path / "rtn")
    assert all(torch.equal(v, rtn[k]) for k, v in packed(tmp_path / "on").items())
    # Nothing of the discarded search is saved, but the (empty) file is: a replay gives the same RTN blocks.
    assert load_file(str(tmp_path / "on" / SEARCH_FILE)) == {}
    quant.quantize(src, tmp_path / "replay", method="awq", awq=AWQOptions(search_file=str(tmp_path / "on")), **OPTS)
    assert (tmp_path / "replay" / "model.safetensors").read_bytes() == (tmp_path / "on" / "model.safetensors").read_bytes()


def test_the_cli_summary_names_the_blocks_kept_at_rtn(tmp_path, monkeypatch):
    src = save_tiny_model("llama", tmp_path / "src")
    monkeypatch.setattr(awq_module, "search_scale", wild_scales(search_scale))
    res = CliRunner().invoke(app, ["awq", str(src), "-o", str(tmp_path / "out"), "--group-size", "32",
                                   "--n-samples", "4", "--seqlen", "32", "--no-clip", "--n-judge", "1"])
    assert res.exit_code == 0, res.output
    assert "blocks kept at RTN" in res.output and "2 of 2 (blocks 0, 1)" in res.output
    off = CliRunner().invoke(app, ["awq", str(src), "-o", str(tmp_path / "off"), "--group-size", "32",
                                   "--n-samples", "4", "--seqlen", "32", "--no-clip", "--held-out", "0"])
    assert off.exit_code == 0 and "not checked (--held-out 0)" in off.output, off.output


@pytest.mark.parametrize("awq_first", [False, True])
def test_gptq_made_worse_on_purpose_falls_back_to_rtn(tmp_path, monkeypatch, awq_first):
    src = save_tiny_model("qwen2", tmp_path / "src")
    real = gptq_module.gptq_quantize

    def flipped(*args, **kwargs):  # every code mirrored: a broken solver
        res = real(*args, **kwargs)
        pw = res.packed
        return replace(res, packed=replace(pw, q=(2**pw.bits - 1) - pw.q))

    monkeypatch.setattr(gptq_module, "gptq_quantize", flipped)
    cfg = dict(OPTS, method="gptq", sym=False, fmt="gptq")
    report = quant.quantize(src, tmp_path / "g", gptq=replace(quant.GPTQOptions(), awq_first=awq_first), **cfg)
    assert all(b.rtn_fallback and b.info["kept"] == "rtn" for b in report.blocks)
    # every candidate of plain GPTQ is then the all-RTN model: no whole-model check; AWQ+GPTQ's plain GPTQ is another
    assert (report.model_check is None) == (not awq_first)
    rtn = quant.quantize(src, tmp_path / "rtn", **dict(cfg, method="rtn"))
    assert not any(b.rtn_fallback for b in rtn.blocks)
    assert all(torch.equal(v, packed(tmp_path / "rtn")[k]) for k, v in packed(tmp_path / "g").items())


def test_gptq_that_beats_rtn_keeps_its_blocks(tmp_path, monkeypatch):
    src = save_tiny_model("qwen2", tmp_path / "src")
    # every whole model scores alike, so the check keeps the method's own model: only the blocks' guard decides
    monkeypatch.setattr(check_module, "window_nlls",
                        lambda model, blocks, batches, finals: [1.0] * sum(map(len, batches)))
    report = quant.quantize(src, tmp_path / "g", method="gptq", **dict(OPTS, n_samples=16))
    assert report.model_check["kept"] == "gptq"
    for b in report.blocks:
        kept_gptq = float(b.info["held-out err"]) <= float(b.info["rtn held-out err"])
        assert b.info["kept"] == ("gptq" if kept_gptq else "rtn") and b.rtn_fallback == (not kept_gptq)


def test_relative_error_weighs_each_token_by_its_own_size():
    ref = torch.ones(1, 2, 4)
    ref[0, 1] *= 100  # a sink-like token, a hundred times larger
    out = ref.clone()
    out[0, 1] += 1  # the same absolute error on either token ...
    big = relative_error([out], [ref])
    out = ref.clone()
    out[0, 0] += 1
    assert relative_error([out], [ref]) == pytest.approx(1e4 * big)  # ... counts 100² times more on the small one


def test_held_out_windows_go_where_they_are_used():
    assert QuantConfig(method="awq").held_out_split == (4, 8)  # AWQ's clip test (judge_windows of its 8), the guard
    assert QuantConfig(method="awq", awq=AWQOptions(judge_windows=16)).held_out_split == (8, 8)
    assert QuantConfig(method="gptq", held_out=5).held_out_split == (0, 5)  # plain GPTQ tests no clips
    assert QuantConfig(method="gptq", gptq=quant.GPTQOptions(awq_first=True), held_out=5).held_out_split == (2, 3)
    assert QuantConfig(method="rtn").held_out_split == (0, 0)


def test_awq_judges_and_tests_clips_on_judge_windows_and_screens_on_screen_windows(tmp_path, monkeypatch):
    import calib.collectors as collectors

    src = save_tiny_model("llama", tmp_path / "src")
    seen = {"judge": set(), "accept": [], "xtx": set()}
    real_judge, real_accept, real_add = awq_module._judge_scale, awq_module._accept_clips, collectors.InputStats.add

    def judge(block, probe, *args):
        seen["judge"].update(r.shape[0] for r in probe.refs)
        return real_judge(block, probe, *args)

    def accept(block, groups, names, weights, clips, calls, *args):
        seen["accept"].append([c.hidden.shape[0] for c in calls])
        return real_accept(block, groups, names, weights, clips, calls, *args)

    def add(self, x, weight=None, xtx=True):
        seen["xtx"].add((x.reshape(-1, x.shape[-1]).shape[0] // 32, xtx))  # windows of 32 tokens
        return real_add(self, x, weight, xtx)

    monkeypatch.setattr(awq_module, "_judge_scale", judge)
    monkeypatch.setattr(awq_module, "_accept_clips", accept)
    monkeypatch.setattr(collectors.InputStats, "add", add)
    opts = {**OPTS, "n_samples": 8}
    quant.quantize(src, tmp_path / "out", method="awq", held_out=10, awq=AWQOptions(judge_windows=3, screen_windows=3),
                   **opts)
    assert seen["judge"] == {3}  # the first minibatch: the judge windows
    assert seen["accept"] == [[3], [3]]  # per block: 3 of the 5 held-out windows for clips are drawn
    assert seen["xtx"] == {(3, True), (5, False)}  # the windows after the screen's add no XᵀX
    with pytest.raises(quant.QtoolError, match="--judge-windows 0 is out of range"):
        AWQOptions(judge_windows=0)


@pytest.mark.parametrize("quantized_inputs", [False, True])
def test_awq_passes_the_search_windows_on_as_the_full_precision_block_outputs_them(tmp_path, monkeypatch,
                                                                                   quantized_inputs):
    import copy

    from calib.runner import run_calls

    src = save_tiny_model("llama", tmp_path / "src")
    seen, real = {}, awq_module.search_block

    def spy(ctx, *args):  # copies: the run frees each block's inputs once they are used
        seen[ctx.index] = (copy.deepcopy(ctx.block), copy.deepcopy(ctx.inputs.calls), copy.deepcopy(ctx.inputs.guard))
        return real(ctx, *args)

    monkeypatch.setattr(awq_module, "search_block", spy)
    quant.quantize(src, tmp_path / "out", method="awq", awq=AWQOptions(quantized_inputs=quantized_inputs), **OPTS)
    fp0, calls0, guard0 = seen[0]
    _, calls1, guard1 = seen[1]
    fp_out = run_calls(fp0, calls0)
    assert all(torch.equal(a, c.hidden) for a, c in zip(fp_out, calls1)) != quantized_inputs
    # The held-out windows always reach the next block through the quantized block.
    assert not any(torch.equal(a, c.hidden) for a, c in zip(run_calls(fp0, guard0), guard1))


@pytest.mark.parametrize("quantized_inputs", [False, True])
def test_awq_writes_each_search_minibatchs_output_over_its_input(tmp_path, monkeypatch, quantized_inputs):
    """With the full-precision outputs passed on, the statistics pass writes each search minibatch's output over
    its input (the first one is kept for the fold check and copied over afterwards), so that a block's inputs and
    outputs are never both held and the next block reads the same memory; with quantized inputs they are needed
    for the next block's pass and kept."""
    src = save_tiny_model("llama", tmp_path / "src")
    kept, ptrs, real = [], [], awq_module.search_block

    def spy(ctx, *args):
        ptrs.append([c.hidden.data_ptr() for c in ctx.inputs.calls])
        result = real(ctx, *args)
        kept.append([c.hidden is not None for c in ctx.inputs.calls])
        return result

    monkeypatch.setattr(awq_module, "search_block", spy)
    opts = {**OPTS, "n_samples": 40}  # search windows: a lead minibatch of 4, then 8 at a time
    quant.quantize(src, tmp_path / "out", method="awq", awq=AWQOptions(quantized_inputs=quantized_inputs), **opts)
    assert len(kept) == 2 and all(len(a) > 2 and a == [True] + [quantized_inputs] * (len(a) - 1) for a in kept)
    assert ptrs[0] == ptrs[1]


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_while_the_method_runs_the_guards_rtn_block_holds_no_dense_weights(tmp_path, monkeypatch, method):
    """The guard's RTN version of a block is packed before the method starts, so that the method's block is the
    only dense copy alive while it runs (a second one of a large block is gigabytes); the RTN block it keeps
    as the whole-model check's alternative is the packed one, and the check's windows run through it without
    its dense weights held (each layer dequantized per call)."""
    import gc

    from torch import nn

    from quant.modules import QuantLinear

    src = save_tiny_model("qwen2", tmp_path / "src")
    dense, alternatives, held = [], [], []

    def count_dense(block):
        own = set(map(id, block.modules()))
        gc.collect()
        dense.append(sum(1 for o in gc.get_objects() if type(o) is nn.Linear and id(o) not in own
                         and o.weight.device.type != "meta"))

    if method == "awq":
        real = awq_module.search_block
        monkeypatch.setattr(awq_module, "search_block", lambda ctx, *a: (count_dense(ctx.block), real(ctx, *a))[1])
    else:
        real = gptq_module.collect_hessians
        monkeypatch.setattr(gptq_module, "collect_hessians",
                            lambda block, *a: (count_dense(block), real(block, *a))[1])
    real_advance = check_module.Alternatives.advance

    def advance(self, i, alts, *a):  # runs the RTN model's windows through the packed block: never held dense
        alternatives.append(alts["rtn"])
        layers = [m for m in alts["rtn"].modules() if isinstance(m, QuantLinear)]
        hooks = [m.register_forward_hook(lambda *_: held.append(sum(len(q.dense_cache or {}) for q in layers)))
                 for m in layers]
        try:
            return real_advance(self, i, alts, *a)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(check_module.Alternatives, "advance", advance)
    quant.quantize(src, tmp_path / "out", method=method, **OPTS)
    assert dense and dense == [0] * len(dense)
    assert held and max(held) == 0
    assert len(alternatives) == 2
    for block in alternatives:
        assert not any(isinstance(m, nn.Linear) for m in block.modules())
        assert sum(isinstance(m, QuantLinear) for m in block.modules()) == 7


def test_input_stats_sum_weighted_gram_matrices_only_over_the_calls_that_count():
    from torch import nn

    from calib.collectors import linear_input_stats

    torch.manual_seed(0)
    lin = nn.Linear(48, 8)
    xs, ws = [torch.randn(2, 50, 48) for _ in range(3)], [torch.rand(2, 50) for _ in range(3)]
    current = []
    with linear_input_stats({"lin": lin}, xtx=True, token_weight=lambda: current[0],
                            xtx_now=lambda: current[1]) as stats:
        for k, (x, w) in enumerate(zip(xs, ws)):
            current[:] = [w, k != 1]  # the second call counts in mean|x| only
            lin(x)
    st = stats["lin"]
    want = sum((x.reshape(-1, 48) * w.reshape(-1, 1)).double().t() @ x.reshape(-1, 48).double()
               for k, (x, w) in enumerate(zip(xs, ws)) if k != 1)
    assert torch.allclose(st.xtx.double(), want, rtol=1e-5, atol=1e-4)
    assert st.n_tokens == 300 and torch.allclose(st.abs_mean, torch.cat(xs).abs().reshape(-1, 48).mean(0))


def test_the_next_blocks_inputs_reuse_the_guards_outputs_bit_identically(tmp_path, monkeypatch):
    """The guard runs the kept block on the guard windows: those outputs are the next block's inputs, not run again."""
    import calib.runner as runner

    from test_streaming import file_digests

    src = save_tiny_model("llama", tmp_path / "src")
    real, runs = runner.run_calls, []
    monkeypatch.setattr(runner, "run_calls", lambda block, calls, **kw: runs.append(len(calls)) or real(block, calls, **kw))
    quant.quantize(src, tmp_path / "reused", method="awq", **OPTS)
    reused = len(runs)
    runs.clear()
    monkeypatch.setattr(BlockInputs, "remember", lambda self, block, calls, outputs: None)
    quant.quantize(src, tmp_path / "again", method="awq", **OPTS)
    assert len(runs) == reused + 2  # one pass over the guard windows per block (2 blocks) saved
    assert file_digests(tmp_path / "reused") == file_digests(tmp_path / "again")


@pytest.mark.parametrize("field, value", [("held_out", 2.5), ("held_out", "4"), ("n_samples", 2.0), ("seqlen", None)])
def test_settings_that_are_not_whole_numbers_are_refused(field, value):
    with pytest.raises(quant.QtoolError, match=f"{field} must be a whole number"):
        QuantConfig(method="awq", **{field: value})
    with pytest.raises(quant.QtoolError, match="n_judge must be a whole number"):
        AWQOptions(n_judge=2.5)


def test_gptq_on_a_block_whose_linears_are_all_skipped(tmp_path):
    src = save_tiny_model("mistral", tmp_path / "src")
    skip = tuple(f"model.layers.0.{n}" for n in ARCHITECTURES["mistral"].linears)
    report = quant.quantize(src, tmp_path / "g", method="gptq", skip=skip, **OPTS)
    assert report.blocks[0].n_linears == 0 and report.blocks[1].n_linears == 7
