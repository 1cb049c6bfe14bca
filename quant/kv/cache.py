"""A transformers ``Cache`` that stores int8/int4 keys and values and dequantizes them on read.

Semantics (write, then read): each ``update`` appends the new tokens to the layer's store, quantizing
every token that falls outside the full-precision window of the ``window`` most recent tokens, and
returns the whole store dequantized. So the attention of the current forward reads exactly what a
kernel reading the quantized cache would read, including the new tokens' own keys and values
(unless they are in the window). Per-token groups are quantized independently, so appending never
re-quantizes old tokens. Per-channel keys start from the calibrated ranges (``qtool kv calibrate``);
a key outside its channel's range (contexts longer than calibration's turn RoPE's keys to angles it
never saw) widens that channel's range, with headroom, and the stored keys are re-quantized under
the wider range once, instead of being clamped.

Per layer, ``[batch, kv_heads, tokens, ...]``:
  key codes ``uint8 [..., head_dim * bits / 8]`` (+ float16 scale, uint8 zero ``[..., 1]`` for
  per-token keys; static float32 ``[kv_heads, head_dim]`` scale/zero for per-channel keys),
  value codes and their float16 scale / uint8 zero, and the fp window ``keys``/``values``.
Sliding-window layers keep only their last ``sliding_window - 1`` tokens, like transformers'
``DynamicSlidingWindowLayer``.
"""
from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from quant.errors import QtoolError
from quant.kv import kernels as kk
from quant.kv import quantizer as kq
from quant.kv.config import KVCacheConfig

_STORED = ("keys", "values", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
# A widened key channel range reaches this fraction of its new width past the key that widened it, so
# that a context growing past the calibrated length re-quantizes its stored keys a few times, not per token.
# Each widening grows the step by at least 1 + h and re-rounds a stored key by at most half a new step, so
# a stored key is within (1 + h) / (2h) steps of the final grid (2.5 for h = 0.25), a new one within half.
KEY_RANGE_HEADROOM = 0.25


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's quantized cache. ``key_range`` is ``(min, max) [kv_heads, head_dim]`` for channel keys."""

    def __init__(self, kv: KVCacheConfig, key_range: tuple[torch.Tensor, torch.Tensor] | None = None,
                 sliding_window: int | None = None):
        super().__init__()
        self.kv = kv
        self.bits = kv.bits
        self.window = kv.window
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.is_croppable = sliding_window is None
        self.per_channel_keys = kv.keys == "channel"
        self._key_range = key_range
        self.k_qparams: tuple[torch.Tensor, torch.Tensor] | None = None
        self.k_range: tuple[torch.Tensor, torch.Tensor] | None = None  # the calibrated range, widened online
        self.key_range_widenings = 0  # how often keys left the range (each re-quantized the stored keys)
        self.cumulative_length = 0
        self._clear()

    def _clear(self) -> None:
        for name in _STORED:
            setattr(self, name, None)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if self.bits == 4 and d % 2:
            raise QtoolError(f"int4 KV cache packs two codes per byte and needs an even head_dim, got {d}")
        empty = lambda last, dt: torch.empty(b, h, 0, last, dtype=dt, device=self.device)
        self.keys, self.values = empty(d, self.dtype), empty(value_states.shape[-1], self.dtype)
        dv = value_states.shape[-1]
        self.k_codes = empty(d * self.bits // 8, torch.uint8)
        self.v_codes = empty(dv * self.bits // 8, torch.uint8)
        self.v_scale, self.v_zero = empty(1, torch.float16), empty(1, torch.uint8)
        if self.per_channel_keys:
            lo, hi = (t.to(self.device) for t in self._key_range)
            if tuple(lo.shape) != (h, d):
                raise QtoolError(f"KV calibration holds [{lo.shape[0]}, {lo.shape[1]}] key channels per layer, "
                                 f"the model caches [{h}, {d}]; calibrate this model")
            self.k_range = (lo.float(), hi.float())
            self.k_qparams = kq.channel_qparams(lo, hi, self.bits)
        else:
            self.k_scale, self.k_zero = empty(1, torch.float16), empty(1, torch.uint8)
        self.is_initialized = True

    # -- quantize on append, dequantize on read --------------------------------------------------
    def _append_quantized(self, k: torch.Tensor, v: torch.Tensor) -> None:
        cat = lambda a, b: torch.cat([a, b], dim=-2)
        if self.per_channel_keys:
            self._widen_key_range(k)
            self.k_codes = cat(self.k_codes, kk.quantize_per_channel(k, *self.k_qparams, self.bits))
        else:
            codes, scale, zero = kk.quantize_per_token(k, self.bits)
            self.k_codes, self.k_scale, self.k_zero = cat(self.k_codes, codes), cat(self.k_scale, scale), cat(self.k_zero, zero)
        codes, scale, zero = kk.quantize_per_token(v, self.bits)
        self.v_codes, self.v_scale, self.v_zero = cat(self.v_codes, codes), cat(self.v_scale, scale), cat(self.v_zero, zero)

    def _widen_key_range(self, k: torch.Tensor) -> None:
        """Widen the channels whose range ``k [batch, kv_heads, tokens, head_dim]`` leaves, with
        ``KEY_RANGE_HEADROOM``, and re-quantize the stored keys under the new range (none is clamped)."""
        lo, hi = self.k_range
        k_lo, k_hi = k.float().amin(dim=(0, 2)), k.float().amax(dim=(0, 2))
        below, above = k_lo < lo, k_hi > hi
        if not (below.any() or above.any()):
            return
        new_lo, new_hi = torch.minimum(lo, k_lo), torch.maximum(hi, k_hi)
        margin = KEY_RANGE_HEADROOM * (new_hi - new_lo)
        new_lo, new_hi = torch.where(below, new_lo - margin, lo), torch.where(above, new_hi + margin, hi)
        stored = kk.dequantize_per_channel(self.k_codes, *self.k_qparams, self.bits, torch.float32)
        self.k_range = (new_lo, new_hi)
        self.k_qparams = kq.channel_qparams(new_lo, new_hi, self.bits)
        if stored.shape[-2]:
            self.k_codes = kk.quantize_per_channel(stored, *self.k_qparams, self.bits)
        self.key_range_widenings += 1

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized part of the store, dequantized: ``[batch, kv_heads, n_quantized, head_dim]``."""
        if self.per_channel_keys:
            k = kk.dequantize_per_channel(self.k_codes, *self.k_qparams, self.bits, self.dtype)
        else:
            k = kk.dequantize_per_token(self.k_codes, self.k_scale, self.k_zero, self.bits, self.dtype)
        v = kk.dequantize_per_token(self.v_codes, self.v_scale, self.v_zero, self.bits, self.dtype)
        return k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        n_out = keys.shape[-2] - self.window  # tokens leaving the fp window
        if n_out > 0:
            self._append_quantized(keys[..., :n_out, :], values[..., :n_out, :])
            keys, values = keys[..., n_out:, :].clone(), values[..., n_out:, :].clone()
        self.keys, self.values = keys, values
        k_q, v_q = self.dequantized()
        k_all, v_all = torch.cat([k_q, keys], dim=-2), torch.cat([v_q, values], dim=-2)
        if self.is_sliding:
            self._keep_last(self.sliding_window - 1)
        return k_all, v_all

    # -- bookkeeping -----------------------------------------------------------------------------
    def _keep_last(self, n: int) -> None:
        """Drop the oldest tokens so that at most ``n`` remain (quantized ones go first)."""
        n_fp = self.keys.shape[-2]
        n_q = self.k_codes.shape[-2]
        drop = n_fp + n_q - n
        if drop <= 0:
            return
        drop_q = min(drop, n_q)
        for name in _STORED[2:]:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[..., drop_q:, :].clone())
        if drop > drop_q:
            self.keys = self.keys[..., drop - drop_q:, :].clone()
            self.values = self.values[..., drop - drop_q:, :].clone()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        if self.cumulative_length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, kv_offset
        return self.cumulative_length + query_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self._clear()
        self.k_qparams, self.k_range, self.key_range_widenings = None, None, 0
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_sliding:
            raise NotImplementedError("cropping a sliding-window quantized KV layer is not supported")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        from_fp = min(n, self.keys.shape[-2])
        self.keys, self.values = self.keys[..., : self.keys.shape[-2] - from_fp, :], self.values[..., : self.values.shape[-2] - from_fp, :]
        from_q = n - from_fp
        if from_q:
            keep = self.k_codes.shape[-2] - from_q
            for name in _STORED[2:]:
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t[..., :keep, :])
        self.cumulative_length -= n

    def _map_stored(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in _STORED:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_stored(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_stored(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_stored(lambda t: t[indices, ...])

    def offload(self):
        self._map_stored(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._map_stored(lambda t: t.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        """Bytes held: codes, per-token scales and zeros, the fp window (static channel scales not counted)."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).nbytes for n in _STORED if getattr(self, n) is not None)


def check_cached_per_head(text_config) -> None:
    """Refuse a model whose cache holds no keys and values per KV head: DeepSeek's multi-head latent attention
    (``kv_lora_rank``) caches a compressed latent and its rotary part, whose shapes ``head_dim`` does not give."""
    rank = getattr(text_config, "kv_lora_rank", None)
    if rank:
        raise QtoolError(f"this {getattr(text_config, 'model_type', '')} model's attention is multi-head latent "
                         f"attention (kv_lora_rank {rank}): its cache holds a compressed latent, not keys and values "
                         "per KV head, which is what the quantized KV cache and kv calibrate quantize")


def _kv_dims(text_config) -> tuple[int, int, int]:
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return text_config.num_hidden_layers, kv_heads, head_dim


def cache_keyword(model) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``cache`` (transformers 5.2x renamed it; the old
    name still works there, with a deprecation warning on every call) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def check_model(config, kv: KVCacheConfig) -> list[dict]:
    """Refuse, in one sentence, a model that ``kv`` cannot cache, from its transformers ``config`` alone (so before
    its weights load): multi-head latent attention, a layer that is not full or sliding-window attention, an odd
    ``head_dim`` for int4 (two codes per byte), or a calibration of another model's shape or type. Returns each layer's cache arguments
    (``sliding_window``)."""
    text_config = config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    if isinstance(layer_kwargs, dict):  # transformers < 5.2x: one kwargs dict shared by every layer
        layer_kwargs = [layer_kwargs] * len(layer_types)
    check_cached_per_head(text_config)
    n_layers, kv_heads, head_dim = _kv_dims(text_config)
    if kv.bits == 4 and head_dim % 2:
        raise QtoolError(f"--kv int4 packs two codes per byte and needs an even head_dim; this model's is {head_dim}; "
                         "use --kv int8")
    if kv.calibration is not None:
        kv.calibration.check_model(n_layers, kv_heads, head_dim, getattr(config, "model_type", ""))
    for i, kind in enumerate(layer_types):
        if kind not in ("full_attention", "sliding_attention"):
            raise QtoolError(f"layer {i} is a {kind!r} layer; the quantized KV cache supports full and "
                             "sliding-window attention layers only")
    return list(layer_kwargs)


class QuantizedKVCache(Cache):
    """int8/int4 KV cache for every layer of a model: ``model.generate(..., cache=QuantizedKVCache(model.config, kv))``
    (``past_key_values=`` before transformers 5.2x; :func:`cache_keyword` says which)."""

    def __init__(self, config, kv: KVCacheConfig):
        layer_kwargs = check_model(config, kv)
        layers = []
        for i, kw in enumerate(layer_kwargs):
            key_range = None
            if kv.keys == "channel":
                key_range = (kv.calibration.key_min[i], kv.calibration.key_max[i])
            layers.append(QuantizedKVLayer(kv, key_range, kw.get("sliding_window")))
        super().__init__(layers=layers)
        self.kv = kv

    def nbytes(self) -> int:
        """Bytes the cache holds now (codes, scales, zeros and fp windows of every layer)."""
        return sum(layer.nbytes() for layer in self.layers)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a quantized or a plain transformers cache."""
    if isinstance(cache, QuantizedKVCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total
