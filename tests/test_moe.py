"""Issue 17, first step: transformers' fused experts as one nn.Linear per expert projection, same outputs."""
from __future__ import annotations

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


def test_awq_on_moe_is_refused_in_one_sentence(tmp_path, capsys):
    from test_bad_input import assert_refused, run_cli

    src = _save(tiny_moe("qwen3_moe"), tmp_path / "src")
    for method, extra in (("awq", []), ("gptq", ["--awq-first"])):
        code, err = run_cli([method, src, "-o", tmp_path / method, "--group-size", "32", *extra], capsys)
        assert_refused(code, err, "mixture-of-experts", "without --awq-first")
        assert not (tmp_path / method).exists()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_gptq_solves_each_expert_on_its_routed_tokens(tmp_path, model_type, monkeypatch, capsys):
    """GPTQ: every expert quantized on its routed tokens; an expert the (biased) router never picks gets
    statistics from every token, is quantized all the same, and is reported in the summary."""
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
    report = quant.quantize(src, tmp_path / "q", method="gptq", bits=4, group_size=32, n_samples=8, seqlen=64,
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
