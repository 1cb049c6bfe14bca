"""Perplexity with the KV cache exercised, so that KV quantization error reaches the logits.

Each window of ``seqlen`` tokens is fed through a fresh cache in chunks of ``chunk`` tokens.
Every forward writes its tokens into the cache and attends to what the cache returns (see
``quant.kv.cache``: write, then read), so each query sees every earlier key and value as stored.

* ``window == 0``: every token, including the query's own, is quantized; the result does not depend
  on ``chunk`` and one forward per window (``chunk = seqlen``) is exactly what token-by-token decoding
  would see.
* ``window = N > 0``: decoding one token at a time, a query sees its N most recent tokens in full
  precision. With chunks of C tokens, the window is counted back from the chunk's last token, so a
  query sees between ``N - C + 1`` and ``N`` recent tokens in full precision: slightly pessimistic
  for C > 1, exact for C = 1. Chunks default to ``min(16, N)``.
* The fp baseline runs through the same chunking with transformers' ``DynamicCache`` and equals
  ``quant.ppl.perplexity`` up to float rounding.

Windows, strides, BOS and which tokens are scored are those of ``quant.ppl.perplexity``, which this
module calls with a stand-in model whose forward runs the window through the cache.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import DynamicCache

from quant.errors import QtoolError
from quant.kv.cache import QuantizedKVCache, cache_keyword
from quant.kv.config import KVCacheConfig
from quant.ppl import PerplexityResult, perplexity


def default_chunk(kv: KVCacheConfig | None, seqlen: int) -> int:
    if kv is None or kv.window == 0:
        return seqlen
    return max(1, min(16, kv.window))


def _make_cache(model, kv: KVCacheConfig | None):
    return DynamicCache(config=model.config) if kv is None else QuantizedKVCache(model.config, kv)


@torch.no_grad()
def window_logits(model, window: torch.Tensor, kv: KVCacheConfig | None, chunk: int) -> torch.Tensor:
    """Logits ``[seq, vocab]`` for ``window [1, seq]`` fed in chunks through a fresh (quantized) cache."""
    cache, keyword = _make_cache(model, kv), cache_keyword(model)
    out = []
    for begin in range(0, window.shape[1], chunk):
        ids = window[:, begin: begin + chunk]
        pos = torch.arange(begin, begin + ids.shape[1], device=window.device)
        res = model(input_ids=ids, **{keyword: cache}, use_cache=True, cache_position=pos,
                    attention_mask=torch.ones(1, begin + ids.shape[1], dtype=torch.long, device=window.device))
        out.append(res.logits[0].float())
    return torch.cat(out)


class _ThroughCache(torch.nn.Module):
    """Looks like the model to ``quant.ppl.perplexity``; its forward feeds each window through the cache."""

    def __init__(self, model, kv: KVCacheConfig | None, chunk: int):
        super().__init__()
        self.model, self.config, self.kv, self.chunk = model, model.config, kv, chunk

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        return SimpleNamespace(logits=window_logits(self.model, input_ids, self.kv, self.chunk)[None])


def check_kv_window(kv: KVCacheConfig | None, seqlen: int, max_tokens: int | None) -> None:
    """QtoolError where ``kv.window`` keeps every token a window holds in full precision (nothing quantized)."""
    longest = min(seqlen, max_tokens) if max_tokens else seqlen  # tokens a window can hold
    if kv is not None and kv.window >= longest - 1:
        raise QtoolError(f"--kv-window {kv.window} keeps every earlier token of a {longest}-token window in full "
                         f"precision, so the cache would quantize nothing; use a window below {longest - 1}")


def kv_perplexity(model, tokenizer, text: str, kv: KVCacheConfig | None, seqlen: int = 512,
                  max_tokens: int | None = None, chunk: int | None = None, stride: int | None = None,
                  add_bos: bool | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` reading keys and values from a ``kv`` cache (None: the fp cache).

    Windows, strides, BOS and scoring are those of :func:`quant.ppl.perplexity`.
    """
    check_kv_window(kv, seqlen, max_tokens)
    if kv is not None and isinstance(text, str):  # a text shorter than the window: its own length bounds the window
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        check_kv_window(kv, seqlen, min(n, max_tokens) if max_tokens else n)
    chunk = chunk or default_chunk(kv, seqlen)
    if chunk < 1:
        raise QtoolError(f"--kv-chunk {chunk} must be a positive number of tokens")
    return perplexity(_ThroughCache(model, kv, chunk), tokenizer, text, seqlen=seqlen, stride=stride,
                      max_tokens=max_tokens, add_bos=add_bos, progress=progress)
