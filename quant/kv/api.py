"""Models whose ``generate()`` uses a quantized KV cache by default."""
from __future__ import annotations

import functools

from quant.kv.cache import QuantizedKVCache, cache_keyword, check_model
from quant.errors import QtoolError
from quant.kv.config import KVCacheConfig, parse_kv


def kv_cache(model, kv: KVCacheConfig | str) -> QuantizedKVCache:
    """A fresh quantized cache for ``model`` (``kv``: a config, or ``"int8"`` / ``"int4"``)."""
    if isinstance(kv, str):
        kv = parse_kv(kv)
    return QuantizedKVCache(model.config, kv)


def with_kv_cache(model, kv: KVCacheConfig | str):
    """Make ``model.generate`` build a fresh quantized cache on every call that passes none; returns ``model``.

    The original method stays reachable as ``model.generate_fp_cache``.
    """
    kv = parse_kv(kv) if isinstance(kv, str) else kv
    if not isinstance(kv, KVCacheConfig):
        raise QtoolError(f"the KV cache settings are {kv!r}; pass a KVCacheConfig(...) or 'int8' / 'int4'")
    if not callable(getattr(model, "generate", None)) or not hasattr(model, "config"):
        raise QtoolError(f"the model given is of type {type(model).__name__}, which has no config and generate(); pass a "
                         "transformers causal LM (quant.load, quant.load_any or AutoModelForCausalLM)")
    QuantizedKVCache(model.config, kv)  # fail now, not at the first generate, on an unsupported model
    original = getattr(model, "generate_fp_cache", model.generate)
    keyword = cache_keyword(model)  # generate takes the cache by the name the forward does

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if all(kwargs.get(k) is None for k in ("cache", "past_key_values")):
            for k in ("cache", "past_key_values"):  # an explicit None beside ours: transformers warns of both
                kwargs.pop(k, None)
            kwargs[keyword] = QuantizedKVCache(model.config, kv)
        return original(*args, **kwargs)

    model.generate_fp_cache = original
    model.generate = generate
    model.kv_cache_config = kv
    return model


def check_folder(model_dir, kv: KVCacheConfig) -> None:
    """Refuse, from ``model_dir/config.json`` alone (before any weight loads), a model that ``kv`` cannot cache:
    :func:`quant.kv.cache.check_model`'s rules. Raises :class:`QtoolError`."""
    from quant import model_io

    check_model(model_io.model_config(model_dir), kv)


def load_with_kv_cache(path, kv: str = "int8", keys: str = "token", window: int = 0, kv_calib=None,
                       dtype="auto", device="auto"):
    """``(model, tokenizer)`` like :func:`quant.load_any`, with a quantized KV cache in ``generate``.

    Per-channel keys use ``kv_calib``, else the calibration file named in ``path/config.json``.
    """
    from quant import load_any

    cfg = parse_kv(kv, keys=keys, window=window, calib=kv_calib, model_dir=path)
    check_folder(path, cfg)
    model, tokenizer = load_any(path, dtype=dtype, device=device)
    return with_kv_cache(model, cfg), tokenizer
