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
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
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
