"""The attention-weighted value Hessians: exact for the attention output, on every attention variant we support."""
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from calib import value_hessian
from calib.collectors import record_block_calls
from calib.runner import BlockInputs
from calib.value_hessian import collect_value_hessians
from quant.arch import blocks_of, lookup, value_heads
from quant.config import GPTQOptions, QuantConfig
from quant.gptq.solver import gptq_quantize, solve_value_heads

# gemma2 has no sdpa path (soft-capping); gemma2/gemma3 bring sliding windows, qwen3 head_dim != hidden/heads,
# opt no grouped-query attention, phi3 its values in the last rows of a fused qkv_proj.
CASES = [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa"), ("gemma2", "eager"), ("gemma3_text", "sdpa"),
         ("gemma3_text", "eager"), ("opt", "sdpa"), ("phi3", "sdpa"), ("phi3", "eager")]


def _setup(model_type, attn, seed=0):
    model = tiny_model(model_type, seed)
    model.set_attn_implementation(attn)
    if model_type == "gemma2":  # make the soft-capping bite: scores of several units, capped at 2
        for block in model.model.layers:
            block.self_attn.attn_logit_softcapping = 2.0
            with torch.no_grad():
                block.self_attn.q_proj.weight.mul_(30)
                block.self_attn.k_proj.weight.mul_(30)
    arch = lookup(model_type)
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(seed))
    blocks = blocks_of(model, arch)
    calls = record_block_calls(model, blocks, ids)
    return arch, blocks, calls


def _attention_output(block, call, o_proj):
    """The input of the output projection: the attention output the value errors reach."""
    seen = {}
    handle = block.get_submodule(o_proj).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    with torch.no_grad():
        block(call.hidden, *call.args, **call.kwargs)
    handle.remove()
    return seen["x"]


def _heads(block, arch, call):
    where = value_heads(block, arch.v_proj, arch.v_fused)
    heads = collect_value_hessians(block, BlockInputs([call]), where.attention, arch.v_proj, where.n_kv_heads)
    return heads, block.get_submodule(arch.v_proj), where


@pytest.mark.parametrize("mix_first", [False, True])
@pytest.mark.parametrize("model_type,attn", CASES)
def test_value_hessian_predicts_the_attention_output_error(model_type, attn, mix_first, monkeypatch):
    """``Σ_h tr(ΔW_h H_h ΔW_hᵀ)`` equals the squared change of the attention output when v_proj changes by ΔW,
    whichever way the Hessians are accumulated."""
    monkeypatch.setattr(value_hessian, "_mix_first", lambda *shape: mix_first)
    arch, blocks, calls = _setup(model_type, attn)
    o_proj = arch.sequential[1][0]
    for i, block in enumerate(blocks):
        call = calls[i]
        heads, v, where = _heads(block, arch, call)
        before = _attention_output(block, call, o_proj)
        dW = 0.05 * torch.randn(v.weight.shape, generator=torch.Generator().manual_seed(i))
        dW[:where.first_row] = 0  # the query and key rows of a fused qkv_proj change the scores, not the values
        with torch.no_grad():
            v.weight += dW
        after = _attention_output(block, call, o_proj)
        with torch.no_grad():
            v.weight -= dW
        measured = float((after - before).double().pow(2).sum())
        kv_heads = 4 if model_type == "opt" else 2  # tiny_models: 4 query heads, 2 key/value heads unless opt
        assert len(heads) == where.n_kv_heads == kv_heads
        assert v.out_features - where.first_row == kv_heads * where.head_dim
        rows = [dW[where.first_row + h * where.head_dim:][:where.head_dim].double() for h in range(len(heads))]
        predicted = sum(float(((r @ H.xtx.double()) * r).sum()) for r, H in zip(rows, heads))
        assert predicted == pytest.approx(measured, rel=1e-3), (model_type, attn, i)
        # One row per token and query head of the group.
        assert heads[0].n_tokens == call.hidden.shape[0] * call.hidden.shape[1] * (
            block.get_submodule(o_proj).in_features // (where.n_kv_heads * where.head_dim))


def test_mixing_the_probabilities_first_is_chosen_only_where_it_saves_work():
    # SmolLM2-135M (3 query heads per key/value head) and a Llama-3-8B-like layer: fewer multiply-adds.
    assert value_hessian._mix_first(3, 512, 512, 576)
    assert value_hessian._mix_first(4, 2048, 2048, 4096)
    # Without grouped-query attention it only adds the products P_qᵀ P_q.
    assert not value_hessian._mix_first(1, 512, 512, 576)
    assert not value_hessian._mix_first(1, 2048, 2048, 4096)


def test_collector_restores_the_attention_and_leaves_the_block_unchanged():
    arch, blocks, calls = _setup("llama", "sdpa")
    block, call = blocks[0], calls[0]
    before = _attention_output(block, call, "self_attn.o_proj")
    config = block.self_attn.config
    _heads(block, arch, call)
    assert block.self_attn.config is config and config._attn_implementation == "sdpa"
    assert torch.equal(_attention_output(block, call, "self_attn.o_proj"), before)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
@pytest.mark.parametrize("act_order", [False, True])
def test_value_heads_solve_lowers_the_attention_output_error(model_type, act_order):
    """The value rows solved per head under their value Hessians change the attention output less than under XᵀX."""
    arch, blocks, calls = _setup(model_type, "sdpa", seed=3)
    block, call = blocks[1], calls[1]
    heads, v, where = _heads(block, arch, call)
    o_proj = arch.sequential[1][0]
    x = {}
    handle = v.register_forward_pre_hook(lambda m, a: x.setdefault("x", a[0].reshape(-1, a[0].shape[-1]).clone()))
    before = _attention_output(block, call, o_proj)
    handle.remove()
    H = x["x"].t() @ x["x"] / x["x"].shape[0]
    cfg = QuantConfig(method="gptq", bits=3, group_size=16, sym=True, fmt="gptq", gptq=GPTQOptions(act_order=act_order))
    W = v.weight.detach().clone()
    plain = gptq_quantize(W, H, cfg).packed
    per_head, _ = solve_value_heads(W, [h.mean for h in heads], cfg, None, where.first_row, H)
    if act_order:  # one column order for all heads: one g_idx for the linear
        assert per_head.g_idx is not None and per_head.g_idx.shape == (W.shape[1],)
    # A fused qkv_proj's query and key rows are solved under XᵀX exactly as before.
    assert torch.equal(per_head.q[:where.first_row], plain.q[:where.first_row])
    assert not torch.equal(per_head.q[where.first_row:], plain.q[where.first_row:])
    errors = {}
    for name, pw in (("plain", plain), ("per head", per_head)):
        with torch.no_grad():
            v.weight.copy_(pw.dequantize(torch.float32))
        errors[name] = float((_attention_output(block, call, o_proj) - before).pow(2).sum())
        with torch.no_grad():
            v.weight.copy_(W)
    assert errors["per head"] < errors["plain"], errors
