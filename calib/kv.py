"""Per-channel key ranges for the calibrated KV cache, collected from the keys *as they are cached*.

Why not hook ``k_proj``: the cache holds keys after RoPE (which mixes channel pairs i and
i + head_dim/2 by a position-dependent rotation) and after any q/k norm (qwen3, gemma3), and phi3
has no separate k_proj at all. Instead the model runs with a recording ``Cache`` whose layers see
exactly the tensors a cache would store, keep their per-channel min and max, and store nothing
(each forward attends within its own batch of tokens, as a plain no-cache forward does).
"""
from __future__ import annotations

import inspect
import logging

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from quant.errors import QtoolError
from quant.kv.cache import cache_keyword, check_cached_per_head
from quant.kv.config import KVCalibration

logger = logging.getLogger(__name__)


class _KeyRangeLayer(DynamicLayer):
    """Records ``min`` and ``max`` over batch and tokens of each (head, channel); caches nothing."""

    def __init__(self, sliding_window: int | None = None):
        super().__init__()
        self.is_sliding = sliding_window is not None
        self.key_min: torch.Tensor | None = None
        self.key_max: torch.Tensor | None = None
        self.n_tokens = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        k = key_states.detach().float()
        lo, hi = k.amin(dim=(0, 2)).cpu(), k.amax(dim=(0, 2)).cpu()  # [batch, heads, tokens, d] -> [heads, d]
        self.key_min = lo if self.key_min is None else torch.minimum(self.key_min, lo)
        self.key_max = hi if self.key_max is None else torch.maximum(self.key_max, hi)
        self.n_tokens += k.shape[0] * k.shape[2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0


class KeyRangeCache(Cache):
    """A cache that only watches: one :class:`_KeyRangeLayer` per decoder layer."""

    def __init__(self, config):
        text_config = config.get_text_config(decoder=True)
        check_cached_per_head(text_config)
        _, layer_kwargs = get_layer_types_and_kwargs(text_config)
        super().__init__(layers=[_KeyRangeLayer(kw.get("sliding_window")) for kw in layer_kwargs])

    def calibration(self, model_type: str = "") -> KVCalibration:
        missing = [i for i, layer in enumerate(self.layers) if layer.key_min is None]
        if missing:
            raise RuntimeError(f"layers {missing} never wrote keys to the cache; this model does not use one")
        return KVCalibration(tuple(layer.key_min for layer in self.layers),
                             tuple(layer.key_max for layer in self.layers),
                             model_type, self.layers[0].n_tokens)


@torch.no_grad()
def collect_key_ranges(model, input_ids: torch.Tensor, batch_size: int = 4) -> KVCalibration:
    """Per-channel ``[min, max]`` of every layer's cached keys over ``input_ids [n, seq]``. Raises QtoolError where a
    layer's keys are not finite (the model's arithmetic overflows on the text: no ranges to scale by)."""
    cache = KeyRangeCache(model.config)
    device = next(model.parameters()).device
    # The logits are never used: the last position's only, where the model can (not [batch, seq, vocab] floats)
    head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    keyword = cache_keyword(model)
    for batch in input_ids.split(batch_size):
        model(input_ids=batch.to(device), **{keyword: cache}, use_cache=True, **head)
        logger.debug("KV calibration: %d tokens", cache.layers[0].n_tokens)
    calibration = cache.calibration(getattr(model.config, "model_type", ""))
    for i, (lo, hi) in enumerate(zip(calibration.key_min, calibration.key_max)):
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise QtoolError(f"layer {i}'s keys hold NaN or inf on the calibration text: the model's arithmetic "
                             "overflows there, so there are no ranges to scale by; qtool ppl on the model names the "
                             "first module")
    return calibration


def outlier_ratio(calib: KVCalibration) -> list[float]:
    """Per layer: the widest channel range over the median channel range (how much per-channel helps)."""
    ratios = []
    for lo, hi in zip(calib.key_min, calib.key_max):
        width = (hi - lo).flatten()
        ratios.append(float(width.max() / width.median().clamp(min=1e-12)))
    return ratios
