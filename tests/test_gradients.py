"""The loss gradients and Gauss-Newton probes behind AWQ's loss judge (calib.gradients, quant.awq.judge)."""
import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_tiny_model, tiny_model

import quant
from calib.collectors import record_block_calls
from calib.gradients import OutputGradients, loss_gradients, module_gradients
from calib.runner import BlockInputs, first_output
from quant import qmath
from quant.arch import ARCHITECTURES
from quant.awq import search_block
from quant.awq.search import candidate_scales
from quant.config import REFUSED_SEARCH_FILE, SEARCH_FILE, AWQOptions, QuantConfig
from quant.methods import BlockContext



def _mean_loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def _direct_gradients(model, ids, module: str):
    """``∂L/∂h`` at every block's output and at its ``module``'s output, from one backward pass of the whole model."""
    outs, mods, hooks = {}, {}, []
    for i, b in enumerate(model.model.layers):
        hooks.append(b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, first_output(o))))
        hooks.append(b.get_submodule(module).register_forward_hook(lambda m, a, o, i=i: mods.__setitem__(i, first_output(o))))
    loss = _mean_loss(model, ids)
    for h in hooks:
        h.remove()
    n = len(outs)
    g = torch.autograd.grad(loss, [outs[i] for i in range(n)] + [mods[i] for i in range(n)])
    return g[:n], g[n:]


def _close(a, b, tol=5e-3):  # the gradients are held in bfloat16
    return float((a.float() - b).norm() / b.norm()) < tol


@pytest.mark.parametrize("model_type,head_tokens", [("llama", 128), ("qwen2", 128), ("gemma3_text", 128),
                                                     ("llama", 6), ("gemma3_text", 6)])
def test_block_and_module_gradients_are_the_whole_models_backward(model_type, head_tokens, monkeypatch):
    monkeypatch.setattr("calib.gradients.HEAD_TOKENS", head_tokens)  # 6: the head a few positions at a time
    model = tiny_model(model_type)
    blocks = model.model.layers
    ids = torch.randint(3, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = loss_gradients(model, blocks, ids, probes=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is left as it was
    at_blocks, at_mlp = _direct_gradients(model, ids, "mlp")
    calls = record_block_calls(model, blocks, ids)
    hidden = calls[0].hidden
    for i, block in enumerate(blocks):
        assert grads[i].probes.shape == (2, 3, 16, model.config.hidden_size)
        assert grads[i].n_tokens == 3 * 15
        assert _close(grads[i].grad, at_blocks[i])
        inside = module_gradients(block, hidden, calls[i].args, calls[i].kwargs, grads[i], ["mlp", "self_attn"])
        assert _close(inside["mlp"].grad, at_mlp[i])
        assert inside["self_attn"].probes.shape == grads[i].probes.shape
        with torch.no_grad():
            hidden = first_output(block(hidden, *calls[i].args, **calls[i].kwargs))


def _loss_with_error(model, ids, block_index: int, error: torch.Tensor) -> float:
    hook = model.model.layers[block_index].register_forward_hook(
        lambda m, a, o: (first_output(o) + error, *o[1:]) if isinstance(o, tuple) else o + error)
    try:
        with torch.no_grad():
            return float(_mean_loss(model, ids))
    finally:
        hook.remove()


def test_the_second_order_estimate_predicts_the_loss_change_of_an_error(monkeypatch):
    """On text the model itself wrote (labels drawn from its own distribution), the Gauss-Newton curvature is
    the loss's expected Hessian: an error orthogonal to the gradient changes the loss by what the probes
    estimate; along the gradient, the first-order term leads. (The head takes 6 positions at a time.)"""
    monkeypatch.setattr("calib.gradients.HEAD_TOKENS", 6)
    model = tiny_model("llama")
    torch.manual_seed(0)
    with torch.no_grad():
        ids = model.generate(torch.randint(3, model.config.vocab_size, (32, 1)), do_sample=True, max_new_tokens=15,
                             min_new_tokens=15, top_k=0, top_p=1.0, pad_token_id=0)
    grads = loss_gradients(model, model.model.layers, ids, probes=64)
    hidden = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: hidden.__setitem__(i, first_output(o)))
             for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        base = float(_mean_loss(model, ids))
    for h in hooks:
        h.remove()
    for i, at in enumerate(grads):
        g = at.grad.float()
        e = torch.randn(g.shape, generator=torch.Generator().manual_seed(2))
        e -= (e * g).sum() / (g * g).sum() * g  # no first-order change
        e *= 0.1 * hidden[i].norm() / e.norm()
        measured = _loss_with_error(model, ids, i, e) - base
        first_only = OutputGradients(at.grad, at.probes[:0], at.n_tokens)
        assert abs(first_only.loss_change(e)) < 0.05 * measured
        # Within the sampling noise of 32 windows of text (the Hessian equals Gauss-Newton in expectation only):
        # a wrong scale (a factor of 2, of the token count) falls outside.
        assert 0.6 * measured < at.loss_change(e) < 1.5 * measured
        d = -1e-3 * hidden[i].norm() * g / g.norm()
        measured = _loss_with_error(model, ids, i, d) - base
        assert at.loss_change(d) == pytest.approx(measured, rel=0.1)


def test_the_loss_judge_picks_the_candidate_with_the_lowest_loss_change():
    """With ``fisher_probes=0`` the loss judge's objective is ``Σ g·e`` at the MLP output, computed here from
    a backward pass of the whole model: the judge picks its minimum among the screened candidates, where
    the squared-error judge picks another."""
    model = tiny_model("llama")
    blocks, arch = model.model.layers, ARCHITECTURES["llama"]
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # make the choice matter: salient input channels of the MLP
        blocks[0].post_attention_layernorm.weight[[3, 17, 40]] *= 25
    call = record_block_calls(model, blocks, ids)[0]
    _, at_mlp = _direct_gradients(model, ids, "mlp")
    grads = loss_gradients(model, blocks, ids, probes=0)
    block = blocks[0]
    gate, up = block.mlp.gate_proj.weight.detach().clone(), block.mlp.up_proj.weight.detach().clone()
    with torch.no_grad():
        ref = block.mlp(_mlp_input(block, call))
    picks = {}
    for judge in ("loss", "error"):
        cfg = QuantConfig(method="awq", group_size=32, awq=AWQOptions(clip=False, judge=judge, n_judge=8))
        inputs = BlockInputs([call], loss={"calls": grads[0]})
        copy = tiny_model("llama").model.layers[0]
        copy.load_state_dict(block.state_dict())
        _, info, _ = search_block(BlockContext(0, copy, list(arch.linears), cfg, arch, inputs))
        picks[judge] = round(float(info["awq α"].split()[2]), 2)  # groups: input norm, v -> o, post-attention norm, up -> down
    mlp_in = _mlp_input(block, call)
    ratios = torch.arange(20, dtype=torch.float32) / 20  # the grid's ratios, each judged from scratch
    changes = {}
    for ratio, s in zip(ratios, candidate_scales(mlp_in.reshape(-1, 64).abs().mean(0), ratios)):
        with torch.no_grad():
            q_gate, q_up = qmath.fake_quantize(gate * s, 4, 32) / s, qmath.fake_quantize(up * s, 4, 32) / s
            out = (F.silu(mlp_in @ q_gate.t()) * (mlp_in @ q_up.t())) @ block.mlp.down_proj.weight.t()
        changes[round(float(ratio), 2)] = float((at_mlp[0] * (out - ref)).sum())
    assert changes[picks["loss"]] <= min(changes[0.0], changes[picks["error"]])
    assert picks["loss"] != picks["error"]


def _mlp_input(block, call):
    with torch.no_grad():
        kw = {k: v for k, v in call.kwargs.items() if k != "hidden_states"}
        x = call.hidden + block.self_attn(hidden_states=block.input_layernorm(call.hidden), **kw)[0]
        return block.post_attention_layernorm(x)


def test_awq_judges_by_the_loss_by_default_and_says_so(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    opts = dict(bits=4, group_size=32, n_samples=8, seqlen=32, dtype="float32", progress=False)
    by_loss = quant.quantize(src, tmp_path / "loss", method="awq", **opts)
    by_error = quant.quantize(src, tmp_path / "error", method="awq", awq=AWQOptions(judge="error"), **opts)
    for b in by_loss.blocks:
        assert "judged dL-rtn mnat" in b.info and "judged err/rtn" not in b.info
        assert float(b.info["judged dL-rtn mnat"]) <= 0  # RTN is among the candidates
    assert all("judged err/rtn" in b.info for b in by_error.blocks)
    # The gradient files live in the run's folder while it runs, never in the checkpoint.
    # (The refused search's file is there where the whole-model check refused the model: a tiny random model's
    # loss can go either way between the two judges.)
    files = lambda p: sorted(str(f.relative_to(p)) for f in p.rglob("*")  # noqa: E731
                             if str(f.relative_to(p)) != REFUSED_SEARCH_FILE)
    assert files(tmp_path / "loss") == files(tmp_path / "error")
    assert SEARCH_FILE in files(tmp_path / "loss")
