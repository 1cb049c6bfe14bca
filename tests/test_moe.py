"""Issue 17: mixture-of-experts models — every expert a linear, calibrated on its routed tokens, quantized, reloaded."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoConfig, AutoModelForCausalLM

from quant.moe import ExpertLinears, swap_in_expert_linears

_MOE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=256, eos_token_id=257, pad_token_id=257)
# Tiny configs of each MoE row: 8 experts, top-2 (qwen2_moe: a shared expert; deepseek_v3: a dense first
# layer and shared experts).
MOE_CONFIGS = {
    "qwen3_moe": dict(_MOE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
                      head_dim=16, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen2_moe": dict(_MOE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(_MOE, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "olmoe": dict(_MOE, num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v3": dict(_MOE, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        intermediate_size=128, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                        kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}


def tiny_moe(model_type: str, seed: int = 0):
    config = AutoConfig.for_model(model_type, **MOE_CONFIGS[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 3:  # fused experts start as zeros/empty in some classes
                p.normal_(0, 0.05)
            elif "gate.weight" in name:  # routers: spread the tokens over the experts
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_expert_linears_compute_what_the_fused_experts_compute(model_type):
    model = tiny_moe(model_type)
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    swapped = swap_in_expert_linears(model)
    assert swapped, "no fused experts found"
    layers = [model.get_submodule(n) for n in swapped]
    assert all(isinstance(m, ExpertLinears) and len(m) == 8 for m in layers)
    names = [n for n, _ in model.named_modules() if n.endswith(".experts.7.down_proj")]
    assert len(names) == len(swapped)  # the Hub's per-expert names: ...mlp.experts.{e}.down_proj
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert not any(p.ndim == 3 for p in model.parameters())


def test_fused_gate_up_rows_split_gate_first():
    model = tiny_moe("qwen3_moe")
    fused = model.model.layers[0].mlp.experts
    experts = ExpertLinears.from_fused(fused)
    inter = fused.gate_up_proj.shape[1] // 2
    assert torch.equal(experts[3].gate_proj.weight, fused.gate_up_proj[3, :inter])
    assert torch.equal(experts[3].up_proj.weight, fused.gate_up_proj[3, inter:])
    assert torch.equal(experts[3].down_proj.weight, fused.down_proj[3])
    meta_fused = type(fused)(model.config).to("meta")  # a streamed skeleton's experts: no weights to copy
    assert ExpertLinears.from_fused(meta_fused)[0].gate_proj.weight.is_meta


def _save(model, path, fused: bool = False):
    """``model`` as a Hub checkpoint (per-expert names), or ``fused``: its transformers 5 state dict as is."""
    from safetensors.torch import save_file
    from tiny_models import byte_tokenizer

    model.save_pretrained(path)
    if fused:
        (path / "model.safetensors").unlink()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_rtn_quantizes_every_expert_and_reloads(tmp_path, model_type):
    import json

    from safetensors.torch import load_file

    import quant
    from quant import model_io, qmath

    model = tiny_moe(model_type)
    src = _save(model, tmp_path / "src")
    report = quant.quantize(src, tmp_path / "q", method="rtn", bits=4, group_size=32, progress=False)
    got = load_file(tmp_path / "q" / "model.safetensors")
    moe_key = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    projs = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    moe_layers = [i for i in range(2) if f"model.layers.{i}.{moe_key}.experts.0.{projs[0]}.qweight" in got]
    assert moe_layers == ([1] if model_type == "deepseek_v3" else [0, 1])  # deepseek: a dense first layer
    for i in moe_layers:
        for e in range(8):
            for proj in projs:
                assert f"model.layers.{i}.{moe_key}.experts.{e}.{proj}.qweight" in got
    assert not [k for k in got if k.endswith("gate_up_proj") or (k.endswith(".gate.weight") is False and got[k].ndim == 3)]
    skipped = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert not [s for s in skipped or [] if "experts." in s]
    assert report.n_quantized >= 2 * 8 * 3 - (8 * 3 if model_type == "deepseek_v3" else 0)

    fp = model_io.load_fp_model(src)  # the per-expert reference, fake-quantized like the checkpoint
    with torch.no_grad():
        for name, mod in fp.named_modules():
            if isinstance(mod, torch.nn.Linear) and "layers." in name and not name.endswith(("mlp.gate", "shared_expert_gate")):
                mod.weight.copy_(qmath.fake_quantize(mod.weight.float(), 4, 32).to(mod.weight.dtype))
    q = quant.load(tmp_path / "q", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, fp(ids).logits, rtol=1e-3, atol=1e-3)  # RTN itself moves them ~1e-1
    assert q.generate(ids[:1, :6], max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_fused_and_per_expert_sources_give_the_same_checkpoint(tmp_path):
    from safetensors.torch import load_file

    import quant

    model = tiny_moe("qwen3_moe")
    a = _save(model, tmp_path / "hub")
    b = _save(model, tmp_path / "fused", fused=True)
    from safetensors import safe_open
    with safe_open(str(b / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    for src in (a, b):
        quant.quantize(src, tmp_path / f"q-{src.name}", method="rtn", bits=4, group_size=32, progress=False)
    x, y = (load_file(tmp_path / f"q-{n}" / "model.safetensors") for n in ("hub", "fused"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _effective_weights(model, search: dict, bits: int, group_size: int) -> None:
    """What an AWQ checkpoint computes, built independently of the fold: every quantized linear of ``model``
    (full precision, per-expert) becomes ``diag(r) Q(diag(1/r) W diag(s), clip) diag(1/s)`` with its saved
    input scale ``s`` and clip, where ``r`` is the scale its output rows were divided by (the input scale of
    the linear it feeds: up -> down, v -> o with the query heads of one value head sharing it); norms and
    routers stay as they are (folding ``s`` into them is exact)."""
    from quant import qmath

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or "layers." not in name or name.endswith(
                    ("mlp.gate", "shared_expert_gate")):
                continue
            s = search.get(f"{name}.awq_scale", torch.ones(mod.in_features))
            r = torch.ones(mod.out_features)
            if name.endswith("up_proj"):
                r = search.get(f"{name[:-len('up_proj')]}down_proj.awq_scale", r)
            elif name.endswith("v_proj") and f"{name[:-len('v_proj')]}o_proj.awq_scale" in search:
                r = search[f"{name[:-len('v_proj')]}o_proj.awq_scale"].reshape(kv, heads // kv, -1)[:, 0].reshape(-1)
            clip = search.get(f"{name}.awq_clip")
            wq = qmath.fake_quantize(mod.weight.float() / r[:, None] * s, bits, group_size, clip=clip)
            mod.weight.copy_(wq / s * r[:, None])


@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_awq_scales_every_expert_and_the_checkpoint_computes_the_scaled_model(tmp_path, model_type):
    """AWQ on each MoE row: one norm scale shared by every expert's gate/up (and folded into the router too),
    a scale per expert for up -> down; the checkpoint's logits equal the unfolded reference's; a replay of
    the saved search gives the same checkpoint."""
    from safetensors.torch import load_file

    import quant
    from quant import model_io
    from quant.config import AWQOptions

    model = tiny_moe(model_type)
    src = _save(model, tmp_path / "src")
    kw = dict(bits=4, group_size=32, progress=False)
    # The squared-error judge: on this random model it picks a scale other than 1, which the test needs to see folded.
    report = quant.quantize(src, tmp_path / "q", method="awq", n_samples=8, seqlen=64, held_out=0,
                            awq=AWQOptions(judge="error"), **kw)
    search = load_file(tmp_path / "q" / "qtool" / "awq_search.safetensors")
    last = len(model.model.layers) - 1
    norm_scale = search[f"model.layers.{last}.mlp.experts.0.gate_proj.awq_scale"]
    for e in range(8):
        for proj in ("gate_proj", "up_proj"):
            assert torch.equal(search[f"model.layers.{last}.mlp.experts.{e}.{proj}.awq_scale"], norm_scale)
        assert f"model.layers.{last}.mlp.experts.{e}.down_proj.awq_scale" in search
    assert torch.equal(search[f"model.layers.{last}.mlp.gate.awq_scale"], norm_scale)  # the router reads it too
    assert not torch.allclose(norm_scale, torch.ones_like(norm_scale))
    assert any("expert tokens min/med/max" in b.info for b in report.blocks)

    fp = model_io.load_fp_model(src)
    _effective_weights(fp, search, 4, 32)
    q = quant.load(tmp_path / "q", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = (q(ids).logits - fp(ids).logits).abs()
    # float16 norms and routers in the checkpoint move the logits ~1e-4 on average; a router left unscaled
    # (or an expert scaled but not stored so) moves them ~3e-3 on average, 1e-1 at most
    assert float(d.mean()) < 5e-4 and float(d.max()) < 1e-2, (float(d.mean()), float(d.max()))
    assert q.generate(ids[:1, :6], max_new_tokens=4, do_sample=False).shape == (1, 10)

    quant.quantize(src, tmp_path / "replay", method="awq", awq=AWQOptions(search_file=str(tmp_path / "q")), **kw)
    # a replayed checkpoint carries the results it replayed: it can be replayed in turn
    quant.quantize(src, tmp_path / "replay2", method="awq", awq=AWQOptions(search_file=str(tmp_path / "replay")), **kw)
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in ("q", "replay", "replay2"))
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_awq_first_clips_bound_the_expert_solves(tmp_path, monkeypatch):
    """AWQ+GPTQ: AWQ's clipping ranges reach GPTQ's per-expert solves, as they reach the dense linears'."""
    import quant
    from quant.config import GPTQOptions
    from quant.gptq import block, solver

    seen = []
    real = solver.gptq_quantize
    spy = lambda W, H, cfg, clip=None, order=None: (seen.append((W.shape, clip is not None)),  # noqa: E731
                                                    real(W, H, cfg, clip, order))[1]
    monkeypatch.setattr(block, "gptq_quantize", spy)  # the dense linears
    monkeypatch.setattr(solver, "gptq_quantize", spy)  # the experts (quant.moe)
    src = _save(tiny_moe("qwen3_moe"), tmp_path / "src")
    quant.quantize(src, tmp_path / "q", method="gptq", gptq=GPTQOptions(awq_first=True), bits=4, group_size=32,
                   n_samples=8, seqlen=64, held_out=0, progress=False)
    downs = [clipped for shape, clipped in seen if shape == (64, 32)]  # each expert's down projection
    gate_ups = [clipped for shape, clipped in seen if shape == (64, 64)]  # each expert's gate + up (and o_proj)
    assert len(downs) == 2 * 8 and len(gate_ups) >= 2 * 8 and all(downs) and all(gate_ups)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_feed_forward_scales_fold_exactly_into_routers_and_shared_experts(model_type):
    from quant import arch as arch_table
    from quant.awq.fold import fold_scales, group_scales
    from quant.awq.experts import feed_forward_groups

    model = tiny_moe(model_type)
    swap_in_expert_linears(model)
    arch = arch_table.lookup(model_type)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None].expand(2, -1)
    for i, block in enumerate(model.model.layers):
        groups = feed_forward_groups(block, *arch.feed_forward)
        norm = [g for g in groups if g.kind == "norm"]
        assert len(norm) == 1 and norm[0].judge == "mlp"
        consumers = set(norm[0].linears)
        if model_type != "deepseek_v3" or i == 1:  # a MoE block: router, every expert, shared expert (and its gate)
            assert "mlp.gate" in consumers and all(f"mlp.experts.{e}.up_proj" in consumers for e in range(8))
            shared = "mlp.shared_expert" if model_type == "qwen2_moe" else "mlp.shared_experts"
            assert f"{shared}.gate_proj" in consumers and f"{shared}.up_proj" in consumers
            if model_type == "qwen2_moe":
                assert "mlp.shared_expert_gate" in consumers
        else:  # DeepSeek's dense first block
            assert consumers == {"mlp.gate_proj", "mlp.up_proj"}
        emb = model.model.rotary_emb(x, pos)
        with torch.no_grad():
            ref = block(x, position_embeddings=emb)
            ref = ref[0] if isinstance(ref, tuple) else ref
            gen = torch.Generator().manual_seed(i)
            scales = {}
            for g in groups:
                width = block.get_submodule(g.linears[0]).weight.shape[1]
                scales.update(group_scales(g, torch.rand(width, generator=gen) + 0.5))
            fold_scales(block, arch, scales)
            out = block(x, position_embeddings=emb)
            out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_the_shared_scale_weighs_each_expert_by_its_routed_tokens():
    """The norm group's closed-form error sums, over the experts, each expert's error under the Hessian of the
    tokens routed to it: those Hessians add up to top-k times the Hessian of all tokens."""
    from quant import arch as arch_table
    from quant.awq.experts import FeedForward, feed_forward_groups

    model = tiny_moe("qwen3_moe")
    swap_in_expert_linears(model)
    block = model.model.layers[1]
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FeedForward.recording(block, "mlp") as ff:
        model(ids)
    x = ff.x
    assert x.shape == (96, 64)
    norm = next(g for g in feed_forward_groups(block, *arch_table.lookup("qwen3_moe").feed_forward) if g.kind == "norm")
    names = [n for n in norm.linears if ".experts." in n]
    parts = list(ff.scale_parts(block, norm.linears, names, {}))
    assert len(parts) == 8 and all(w.shape == (2 * 32, 64) for w, _ in parts)  # one expert (gate + up) at a time
    total = sum(h for _, h in parts)
    torch.testing.assert_close(total, 2 * x.t() @ x, rtol=1e-4, atol=1e-3)  # top-2 routing


def test_an_expert_clip_that_raises_its_held_out_error_is_dropped():
    from quant.awq.search import QuantSpec
    from quant.awq.experts import FeedForward, accept_expert_clips

    model = tiny_moe("mixtral")
    swap_in_expert_linears(model)
    block = model.model.layers[0]
    with torch.no_grad(), FeedForward.recording(block, "mlp") as ff:
        model(torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0)))
    names = [f"mlp.experts.{e}.{p}" for e in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")]
    harsh = {n: torch.full((block.get_submodule(n).out_features, 1), 0.3) for n in names}
    assert accept_expert_clips(block, ff, names, {}, harsh, QuantSpec(4, 32)) == {}
    mild = {n: torch.full((block.get_submodule(n).out_features, 1), 0.97) for n in names}  # near-lossless clips
    kept = accept_expert_clips(block, ff, names, {}, dict(harsh, **{names[0]: mild[names[0]]}), QuantSpec(4, 32))
    assert set(kept) <= {names[0]}


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_each_expert_is_calibrated_on_its_routed_tokens(tmp_path, model_type, method, monkeypatch, capsys):
    """GPTQ and AWQ: every expert quantized on its routed tokens; an expert the (biased) router never picks
    gets statistics from every token, is quantized all the same, and is reported in the summary."""
    import json

    import quant
    from quant import moe

    model = tiny_moe(model_type)
    src = _save(model, tmp_path / "src")
    router = type(model.model.layers[-1].mlp.gate)
    real = router.forward
    counts = []
    real_tokens = moe.expert_tokens
    monkeypatch.setattr(router, "forward", _masking(real, 7))
    monkeypatch.setattr(moe, "expert_tokens",
                        lambda h, i, e: (lambda r: counts.append((e, r[1], r[2])) or r)(real_tokens(h, i, e)))
    report = quant.quantize(src, tmp_path / "q", method=method, bits=4, group_size=32, n_samples=8, seqlen=64,
                            held_out=0, progress=False)
    from cli.report import print_quant_report

    print_quant_report(report)
    summary = capsys.readouterr().out
    assert "routed tokens per expert" in summary and "min 0," in summary
    assert f"block {report.blocks[-1].index}: 7" in summary  # the summary names the expert that fell back
    assert counts and all(fb for e, n, fb in counts if e == 7) and all(n == 0 for e, n, _ in counts if e == 7)
    assert any(n > 0 and not fb for e, n, fb in counts if e != 7)
    rows = json.loads((tmp_path / "q" / "qtool.json").read_text())["qtool"]["report"]["blocks"]
    moe_rows = [r for r in rows if "expert fallback" in r["info"]]
    assert moe_rows and all("7" in r["info"]["expert fallback"].split(",") for r in moe_rows)
    assert all(r["info"]["expert tokens min/med/max"].startswith("0/") for r in moe_rows)
    from safetensors.torch import load_file
    got = load_file(tmp_path / "q" / "model.safetensors")
    key = "block_sparse_moe.experts.7.w2" if model_type == "mixtral" else "mlp.experts.7.down_proj"
    assert f"model.layers.1.{key}.qweight" in got
    q = quant.load(tmp_path / "q", dtype=torch.float32)
    assert q.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def _masking(real_forward, expert: int):
    """A router forward whose ``expert`` never makes the top-k: its logit is pushed to -1e4 before routing."""
    import torch.nn.functional as F

    def forward(self, hidden_states):
        original = F.linear

        def linear(x, w, b=None):
            out = original(x, w, b)
            if w is self.weight:
                out = out.clone()
                out[..., expert] = -1e4
            return out

        F.linear = linear
        try:
            return real_forward(self, hidden_states)
        finally:
            F.linear = original

    return forward


def test_a_moe_config_that_does_not_fit_is_one_sentence(tmp_path, capsys):
    import json

    from test_bad_input import assert_refused, run_cli

    src = _save(tiny_moe("olmoe"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["num_experts_per_tok"] = 10
    (src / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32"], capsys)
    assert_refused(code, err, "num_experts_per_tok 10", "8 experts")
    config["num_experts_per_tok"], config["intermediate_size"] = 2, 64
    (src / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32"], capsys)
    assert_refused(code, err, "has shape", "config.json")
    assert not (tmp_path / "q").exists()


_PEAK_RSS = """
import json, sys
sys.path.insert(0, {root!r})
import quant
r = quant.quantize({src!r}, {out!r}, method={method!r}, bits=4, group_size=32, n_samples=8, seqlen=64, progress=False)
print(json.dumps(r.peak_rss_mb))
"""


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_peak_memory_grows_with_the_block_weights_not_with_per_expert_statistics(tmp_path, method):
    """8 vs 64 experts of 32 channels on a 1024-wide model (one block): the experts' weights grow by 21 MiB
    (float32), while Hessians of every expert held at once would add 56 x 4 MiB. The peak RSS (each run in
    its own process) may grow by a few copies of the block's weights only."""
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(__file__).resolve().parents[1]
    peak, weights = {}, {}
    for n in (8, 64):
        config = AutoConfig.for_model("qwen3_moe", **dict(
            MOE_CONFIGS["qwen3_moe"], hidden_size=1024, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, num_experts=n, moe_intermediate_size=32))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0, 0.05)
        weights[n] = sum(p.numel() * 4 for p in model.model.layers[0].parameters()) / 2**20
        src = _save(model, tmp_path / f"src-{n}")
        code = _PEAK_RSS.format(root=str(root), src=str(src), out=str(tmp_path / f"q-{n}"), method=method)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    growth, block_growth = peak[64] - peak[8], weights[64] - weights[8]
    assert 15 < block_growth < 30
    assert growth < 6 * block_growth, (peak, weights)  # every expert's Hessian at once: > 224 MiB more


def test_skip_takes_a_module_that_holds_several_linears(tmp_path):
    """`--skip mlp.shared_expert` keeps the shared expert's three linears; `experts.3` keeps expert 3 of every layer."""
    from safetensors.torch import load_file

    import quant
    from quant.errors import QtoolError

    src = _save(tiny_moe("qwen2_moe"), tmp_path / "src")
    quant.quantize(src, tmp_path / "q", method="rtn", group_size=32, skip=("mlp.shared_expert", "experts.3"),
                   progress=False)
    got = load_file(tmp_path / "q" / "model.safetensors")
    for i in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.shared_expert.{proj}.weight" in got
            assert f"model.layers.{i}.mlp.experts.3.{proj}.weight" in got
            assert f"model.layers.{i}.mlp.experts.2.{proj}.qweight" in got
    with pytest.raises(QtoolError, match="no linear layer"):
        quant.quantize(src, tmp_path / "r", method="rtn", group_size=32, skip=("mlp.shared_exper",), progress=False)


def test_the_kv_cache_refuses_multi_head_latent_attention_in_one_sentence():
    """DeepSeek-V3 caches a compressed latent: kv calibrate wrote a file of its shape that every use then refused,
    and int4's even-head_dim check looked at the wrong dimension."""
    from calib.kv import collect_key_ranges
    from quant.errors import QtoolError
    from quant.kv import with_kv_cache

    model = tiny_moe("deepseek_v3")
    for call in (lambda: with_kv_cache(model, "int8"), lambda: collect_key_ranges(model, torch.randint(0, 200, (1, 16)))):
        with pytest.raises(QtoolError, match="multi-head latent attention .kv_lora_rank"):
            call()
    with_kv_cache(tiny_moe("qwen3_moe"), "int4")  # experts are no matter to the cache


@pytest.mark.parametrize("model_type, key", [("mixtral", "model.layers.0.block_sparse_moe.experts.2.w1.qweight"),
                                             ("qwen3_moe", "model.layers.0.self_attn.q_proj.qweight")])
def test_a_packed_tensor_of_another_shape_is_one_sentence_in_a_moe_checkpoint(tmp_path, capsys, model_type, key):
    """The shape checks ran only for families stored with transformers' own names: info called a MoE checkpoint
    with a truncated expert healthy and ppl ended in load_state_dict's traceback."""
    from safetensors.torch import load_file, save_file
    from test_bad_input import assert_refused, run_cli

    src = _save(tiny_moe(model_type), tmp_path / "src")
    assert run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32"], capsys)[0] == 0
    f = tmp_path / "q" / "model.safetensors"
    t = load_file(str(f))
    t[key] = t[key][:, :2].clone()
    save_file(t, str(f), metadata={"format": "pt"})
    for args in (["info", tmp_path / "q"], ["ppl", tmp_path / "q", "--max-tokens", "64", "--seqlen", "32"]):
        assert_refused(*run_cli(args, capsys), f"{key} has shape [", "the checkpoint does not match its config.json")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_info_gives_the_moe_reasons_not_a_remote_code_one(tmp_path, capsys, model_type):
    """Every MoE checkpoint was said to need remote code in transformers ("it has no qwen3_moe model class"), which
    has classes for them: the reasons are the routed experts' (transformers fuses them and leaves them random;
    GPTQModel dropped a Mixtral's experts)."""
    from test_bad_input import run_cli

    from quant.info import checkpoint_info

    src = _save(tiny_moe(model_type), tmp_path / "src")
    assert run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32"], capsys)[0] == 0
    loaders = checkpoint_info(tmp_path / "q").loaders
    assert "fuses routed experts" in loaders["transformers"], loaders
    assert "dropped a Mixtral's experts" in loaders["gptqmodel"], loaders
    assert loaders["vllm"] is None


@pytest.mark.parametrize("top_k", [0, 10, -1, "2", 2.0])
def test_a_top_k_that_routes_to_no_expert_or_to_more_than_all_is_one_sentence(tmp_path, capsys, top_k):
    """num_experts_per_tok 0 made every MoE layer add nothing: rtn, gptq and ppl went on (ppl printed its number)
    and AWQ failed in its gradients' traceback; in a quantized checkpoint info vouched for it and ppl printed a
    number (0) or a traceback (9, -1); "2" or 2.0 failed in transformers' config class. Sources and checkpoints."""
    from test_bad_input import assert_refused, run_cli

    src = _save(tiny_moe("qwen3_moe"), tmp_path / "src")
    assert run_cli(["rtn", src, "-o", tmp_path / "q", "--group-size", "32"], capsys)[0] == 0
    for folder in (src, tmp_path / "q"):
        config = json.loads((folder / "config.json").read_text())
        config["num_experts_per_tok"] = top_k
        (folder / "config.json").write_text(json.dumps(config))
    said = f"num_experts_per_tok {top_k!r} is not a number of experts each token is routed to; use 1 to the 8 experts"
    for args in (["rtn", src, "-o", tmp_path / "r", "--group-size", "32"],
                 ["ppl", src, "--max-tokens", "64", "--seqlen", "32"], ["info", tmp_path / "q"],
                 ["ppl", tmp_path / "q", "--max-tokens", "64", "--seqlen", "32"]):
        assert_refused(*run_cli(args, capsys), said)


def test_a_target_that_cannot_read_the_experts_is_not_told_to_pass_sym():
    """--target gptqmodel on a Mixtral ended "; pass --sym for symmetric weights", and --sym was refused too."""
    from quant.errors import QtoolError
    from quant.formats.compat import Written, check_target

    with pytest.raises(QtoolError, match="dropped a Mixtral's experts") as refused:
        check_target("gptqmodel", Written("gptq_v2", 3, False, True, 32, moe=True))
    assert "--sym" not in str(refused.value)
    with pytest.raises(QtoolError, match="pass --sym"):  # where --sym alone would do, it is said
        check_target("vllm", Written("gptq_v2", 4, False, False, 128))
