"""KV-cache quantization: int8/int4 keys and values in a transformers ``Cache``.

    from quant.kv import KVCacheConfig, QuantizedKVCache
    cache = QuantizedKVCache(model.config, KVCacheConfig(bits=4, window=64))
    model.generate(ids, cache=cache, max_new_tokens=100)  # past_key_values=cache before transformers 5.2x

Modules: ``quantizer`` (the reference math and layouts), ``config`` (settings, calibration file),
``cache`` (the Cache), ``eval`` (perplexity through the cache), ``api`` (model with a quantized cache).
"""
from quant.kv.api import kv_cache, load_with_kv_cache, with_kv_cache
from quant.kv.cache import QuantizedKVCache, QuantizedKVLayer, cache_nbytes
from quant.kv.config import KV_PRESETS, KVCacheConfig, KVCalibration, parse_kv
from quant.kv.eval import kv_perplexity

__all__ = ["KV_PRESETS", "KVCacheConfig", "KVCalibration", "QuantizedKVCache", "QuantizedKVLayer",
           "cache_nbytes", "kv_cache", "kv_perplexity", "load_with_kv_cache", "parse_kv", "with_kv_cache"]
