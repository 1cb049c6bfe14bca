"""Tiny random-initialised models of every architecture row, saved as Hugging Face folders (no network)."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 320  # 256 byte symbols + specials, rounded up
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=256, eos_token_id=257, pad_token_id=257)

CONFIGS = {
    "llama": dict(_COMMON, tie_word_embeddings=False),
    "mistral": dict(_COMMON),
    "qwen2": dict(_COMMON, tie_word_embeddings=True),
    "qwen3": dict(_COMMON, head_dim=16),
    "internlm3": dict(_COMMON, head_dim=16, qkv_bias=False, bias=False),
    "gemma": dict(_COMMON, head_dim=16),
    "gemma2": dict(_COMMON, head_dim=16, sliding_window=8),
    "gemma3_text": dict(_COMMON, head_dim=16, sliding_window=8, sliding_window_pattern=2),
    "phi3": dict(_COMMON),
    "opt": dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=256, eos_token_id=257,
                pad_token_id=257),
}
MODEL_TYPES = sorted(CONFIGS)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # Random norms instead of ones/zeros, so that a scale folded into the wrong place shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_model(model_type: str, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny ``model_type`` model with a byte tokenizer to ``path``; returns the path."""
    path = Path(path)
    tiny_model(model_type, seed, dtype).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
