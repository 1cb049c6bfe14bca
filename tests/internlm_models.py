"""Tiny InternLM2-layout checkpoints made from tiny random Llamas (no remote code, no network).

The fused ``wqkv`` is built here from the layout documented in ../shared/notes/internlm.md
(per key/value head h: its g query heads, then key head h, then value head h), written out
independently of qtool's own code so that a mistake in either shows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import CONFIGS, byte_tokenizer

RENAMES = [  # (llama, internlm2) module names
    ("model.embed_tokens.", "model.tok_embeddings."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.gate_proj.", ".feed_forward.w1."),
    (".mlp.up_proj.", ".feed_forward.w3."),
    (".mlp.down_proj.", ".feed_forward.w2."),
]


def llama(n_heads: int, n_kv_heads: int, seed: int = 0, layers: int = 2, **extra):
    config = AutoConfig.for_model("llama", **dict(CONFIGS["llama"], num_attention_heads=n_heads,
                                                  num_key_value_heads=n_kv_heads, num_hidden_layers=layers,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                                  **extra))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_kv: int, head_dim: int) -> torch.Tensor:
    g = q.shape[0] // (n_kv * head_dim)
    rows = []
    for h in range(n_kv):
        rows += [q[h * g * head_dim:(h + 1) * g * head_dim], k[h * head_dim:(h + 1) * head_dim],
                 v[h * head_dim:(h + 1) * head_dim]]
    return torch.cat(rows)


def internlm2_tensors(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        out[f"model.layers.{i}.attention.wqkv.weight"] = fuse_wqkv(
            sd.pop(p + "q_proj.weight"), sd.pop(p + "k_proj.weight"), sd.pop(p + "v_proj.weight"),
            cfg.num_key_value_heads, head_dim)
    for k, v in sd.items():
        for a, b in RENAMES:
            k = k.replace(a, b)
        out["output.weight" if k == "lm_head.weight" else k] = v
    return out


def save_internlm2(model, path: str | Path, model_type: str = "internlm2", rope_scaling: dict | None = None) -> Path:
    """``model`` (a llama) written as an InternLM2 checkpoint: names, fused wqkv, config, remote-code pointers."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    save_file(internlm2_tensors(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": model_type, "bias": False, "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": 1e6, "rope_scaling": rope_scaling,
        "tie_word_embeddings": False, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "initializer_range": 0.02, "pretraining_tp": 1,
        "attn_implementation": "eager", "torch_dtype": "float32", "use_cache": True,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    byte_tokenizer().save_pretrained(path)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.update({"tokenizer_class": "InternLM2Tokenizer",
                    "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                                   "tokenization_internlm2_fast.InternLM2TokenizerFast"]}})
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return path
