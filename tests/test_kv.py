"""KV-cache quantization: quantizer error bounds, the Cache against transformers' own, generate() on every
architecture row (fp and int4 weights), calibration, perplexity through the cache, and the CLI."""
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import MODEL_TYPES, byte_tokenizer, save_tiny_model, tiny_model
from transformers import DynamicCache

import quant
from calib.kv import collect_key_ranges
from cli.main import app
from quant.errors import QtoolError
from quant.kv import (
    KVCacheConfig,
    KVCalibration,
    QuantizedKVCache,
    kv_perplexity,
    parse_kv,
    with_kv_cache,
)
from quant.kv import quantizer as kq
from quant.kv.cache import cache_keyword
from quant.kv.config import CALIB_FILENAME, calibration_reference

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 3


def kv_like(shape=(2, 3, 17, 16), seed=0, outlier_channel=5):
    """Random keys with one outlier channel, like real post-RoPE keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., outlier_channel] *= 20
    return x


# -- the reference quantizer -------------------------------------------------------------------------
def test_pack_int4_round_trips_every_byte():
    p = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    q = kq.unpack_int4_u8(p)
    assert q.shape == (4, 128) and int(q.max()) == 15
    assert torch.equal(kq.pack_int4_u8(q), p)
    assert torch.equal(q[0, :4], torch.tensor([0, 0, 1, 0], dtype=torch.uint8))  # byte 1 = code 1 low, 0 high


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_error_is_at_most_half_a_step(bits):
    x = kv_like()
    codes, scale, zero = kq.quantize_per_token(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (*x.shape[:-1], x.shape[-1] * bits // 8)
    assert scale.dtype == torch.float16 and zero.dtype == torch.uint8 and scale.shape == (*x.shape[:-1], 1)
    err = (kq.dequantize_per_token(codes, scale, zero, bits) - x).abs()
    # Half a step, plus what rounding the scale to float16 (2^-11 relative) costs at the far end of the range.
    maxq = 2**bits - 1
    bound = scale.float() * (0.5 + maxq * 2.0**-11) + 1e-6
    assert (err <= bound).all(), (err - bound).max()
    assert err.mean() < 0.3 * scale.float().mean()  # not just bounded: errors are spread like rounding errors


def test_per_token_keeps_zeros_exact_and_tolerates_constant_rows():
    x = torch.zeros(1, 1, 3, 8)
    x[0, 0, 1] = 2.5  # a constant positive row: its range is widened to contain 0
    y = kq.fake_quantize_per_token(x, 4)
    assert torch.equal(y[0, 0, 0], torch.zeros(8)) and torch.allclose(y[0, 0, 1], x[0, 0, 1], rtol=1e-3)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_error_inside_the_range_and_clamping_outside(bits):
    x = kv_like(seed=1)
    lo, hi = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))  # [heads, d]
    scale, zero = kq.channel_qparams(lo, hi, bits)
    y = kq.dequantize_per_channel(kq.quantize_per_channel(x, scale, zero, bits), scale, zero, bits)
    assert ((y - x).abs() <= scale[:, None, :] / 2 + 1e-5).all()
    y_out = kq.dequantize_per_channel(kq.quantize_per_channel(x * 3, scale, zero, bits), scale, zero, bits)
    assert (y_out <= hi[:, None, :] + 1e-4).all() and (y_out >= lo[:, None, :] - 1e-4).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_channel_keys_past_the_calibrated_range_widen_it_instead_of_clamping(bits):
    # Calibrated on short contexts; a longer one brings keys 3x outside that range (as RoPE does past the
    # calibrated length). Clamping would cost up to 2/3 of those keys; the cache widens the range instead.
    from quant.kv.cache import KEY_RANGE_HEADROOM, QuantizedKVLayer

    x = kv_like(shape=(1, 3, 40, 16), seed=3)
    short = x[:, :, :8]
    lo, hi = short.amin(dim=(0, 2)), short.amax(dim=(0, 2))
    calib = KVCalibration(key_min=(lo,), key_max=(hi,))
    layer = QuantizedKVLayer(KVCacheConfig(bits=bits, keys="channel", calibration=calib), (lo, hi))
    x = torch.cat([short, 3 * x[:, :, 8:]], dim=2)
    for t in range(0, 40, 4):  # decoding in chunks: old keys are re-quantized when the range widens
        k, _ = layer.update(x[:, :, t:t + 4], torch.zeros_like(x[:, :, t:t + 4]))
    scale = layer.k_qparams[0][:, None, :]
    assert layer.key_range_widenings >= 1
    assert (layer.k_range[0] <= x.amin(dim=(0, 2))).all() and (layer.k_range[1] >= x.amax(dim=(0, 2))).all()
    # A stored key is rounded again at each widening, by at most half a step of the new grid; each widening
    # grows the step by at least 1 + headroom, so the halves add up to at most (1 + h) / (2h) final steps.
    h = KEY_RANGE_HEADROOM
    assert ((k - x).abs() <= scale * (1 + h) / (2 * h) + 1e-5).all()
    clamped = torch.maximum(torch.minimum(x, hi[None, :, None, :]), lo[None, :, None, :])
    assert (k - x).abs().max() < 0.25 * (clamped - x).abs().max()  # what clamping to the calibrated range costs
    assert ((k - x)[:, :, -4:].abs() <= scale / 2 + 1e-5).all()  # the newest keys: once, half a step
    # Keys within the headroom just added leave the range as it is.
    widened, (lo2, hi2) = layer.key_range_widenings, layer.k_range
    inside = (lo2 + (hi2 - lo2) * 0.5)[None, :, None, :].expand(1, 3, 2, 16)
    layer.update(inside, torch.zeros_like(inside))
    assert layer.key_range_widenings == widened and 0 < KEY_RANGE_HEADROOM < 1


def test_per_channel_beats_per_token_on_keys_with_an_outlier_channel():
    x = kv_like(seed=2)
    lo, hi = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
    sc = kq.channel_qparams(lo, hi, 4)
    per_channel = kq.dequantize_per_channel(kq.quantize_per_channel(x, *sc, 4), *sc, 4)
    per_token = kq.fake_quantize_per_token(x, 4)
    normal = torch.arange(x.shape[-1]) != 5  # per token, the outlier channel's range swamps the other channels
    assert (per_channel - x)[..., normal].pow(2).mean() < 0.1 * (per_token - x)[..., normal].pow(2).mean()


def test_bad_bits_are_refused():
    with pytest.raises(ValueError, match="use 8 or 4"):
        kq.quantize_per_token(torch.zeros(1, 4), 3)


# -- the Cache against transformers' DynamicLayer ----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,window", [(8, 0), (4, 0), (4, 3)])
def test_cache_returns_what_the_fp_cache_returns_within_the_bound(dtype, bits, window):
    model = tiny_model("llama")
    fp, q = DynamicCache(config=model.config), QuantizedKVCache(model.config, KVCacheConfig(bits=bits, window=window))
    seen_k, seen_v = [], []
    for step, n in enumerate([5, 1, 1, 4, 1]):
        k, v = kv_like((2, 2, n, 16), seed=step).to(dtype), kv_like((2, 2, n, 16), seed=100 + step).to(dtype)
        seen_k.append(k)
        seen_v.append(v)
        want = fp.update(k, v, 0)
        got = q.update(k, v, 0)
        for w, g in zip(want, got):
            assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device
        full_k = torch.cat(seen_k, dim=-2)
        ref_k = kq.fake_quantize_per_token(full_k.float(), bits)
        if window:
            ref_k[..., -window:, :] = full_k[..., -window:, :].float()  # the window is stored unquantized
        tol = 1e-6 if dtype == torch.float32 else 2e-2 * full_k.float().abs().max()
        assert torch.allclose(got[0].float(), ref_k, atol=tol, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
        assert q.get_seq_length(0) == fp.get_seq_length(0)
        assert q.get_mask_sizes(1, 0) == fp.get_mask_sizes(1, 0)


@pytest.mark.parametrize("bits,keys,per_token_bytes", [(8, "token", 2 * (16 + 3)), (4, "token", 2 * (8 + 3)),
                                                       (4, "channel", 8 + (8 + 3))])
def test_cache_bytes_per_token_include_scales_and_zeros(bits, keys, per_token_bytes):
    model = tiny_model("llama")
    calib = KVCalibration(tuple(torch.full((2, 16), -1.0) for _ in range(2)), tuple(torch.ones(2, 16) for _ in range(2)))
    cache = QuantizedKVCache(model.config, KVCacheConfig(bits=bits, keys=keys, calibration=calib))
    for layer in range(2):
        cache.update(torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16), layer)
    assert cache.nbytes() == 2 * 3 * 2 * 10 * per_token_bytes  # layers * batch * heads * tokens * bytes


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_the_cache_builds_every_layer_with_older_transformers(monkeypatch, model_type):
    """transformers < 5.2x returns one kwargs dict shared by all layers from get_layer_types_and_kwargs
    (5.17 on the GPU machine did); the cache once zipped its keys and built no layer at all."""
    import quant.kv.cache as kv_cache

    current = kv_cache.get_layer_types_and_kwargs

    def old_api(config):
        types, per_layer = current(config)
        return types, {k: v for kw in per_layer for k, v in kw.items()}

    monkeypatch.setattr(kv_cache, "get_layer_types_and_kwargs", old_api)
    model = tiny_model(model_type)
    cache = QuantizedKVCache(model.config, KVCacheConfig(bits=8))
    assert len(cache.layers) == model.config.num_hidden_layers
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, **{cache_keyword(model): cache}, pad_token_id=257)
    assert out.shape == (1, 15)


def test_sliding_window_layers_keep_only_the_window():
    model = tiny_model("gemma2")  # sliding_window=8 on every other layer
    cache = QuantizedKVCache(model.config, KVCacheConfig(bits=8, window=2))
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, **{cache_keyword(model): cache}, pad_token_id=257)
    assert out.shape == (1, 26)
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    assert sliding and all(layer.k_codes.shape[-2] + layer.keys.shape[-2] == 7 for layer in sliding)
    assert all(layer.keys.shape[-2] == 2 for layer in cache.layers)


# -- generate() on every architecture row --------------------------------------------------------------
def greedy(model, ids, cache, n=8):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         **{cache_keyword(model): cache}, pad_token_id=257, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def assert_same_tokens_or_near_tie(model, ids, kv, margin=0.02):
    """int8 greedy tokens equal the fp cache's; a divergence is allowed only where the fp logits of the
    two tokens differ by less than ``margin`` (a near tie in a random-init tiny model), after which the
    sequences are unrelated and the comparison stops."""
    want, want_logits = greedy(model, ids, DynamicCache(config=model.config))
    got, got_logits = greedy(model, ids, QuantizedKVCache(model.config, kv))
    assert got.shape == want.shape
    new_want, new_got = want[:, ids.shape[1]:], got[:, ids.shape[1]:]
    for b in range(ids.shape[0]):
        diff = (new_want[b] != new_got[b]).nonzero()
        t = int(diff[0]) if len(diff) else new_want.shape[1]
        assert (got_logits[b, :t] - want_logits[b, :t]).abs().max() < margin if t else True
        if t < new_want.shape[1]:
            gap = want_logits[b, t, new_want[b, t]] - want_logits[b, t, new_got[b, t]]
            assert gap < margin, f"batch {b}: tokens differ at step {t} although fp prefers its token by {gap:.3g}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_int8_kv_matches_the_fp_cache_and_int4_runs(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    assert_same_tokens_or_near_tie(model, ids, KVCacheConfig(bits=8))
    seq, logits = greedy(model, ids, QuantizedKVCache(model.config, KVCacheConfig(bits=4, window=4)))
    assert seq.shape == (2, 18) and torch.isfinite(logits).all()


def test_generate_int8_kv_gives_identical_tokens_on_tiny_llama():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    want, _ = greedy(model, ids, DynamicCache(config=model.config), n=16)
    got, _ = greedy(model, ids, QuantizedKVCache(model.config, KVCacheConfig(bits=8)), n=16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_with_int4_weights_and_quantized_kv(tmp_path, model_type):
    src = save_tiny_model(model_type, tmp_path / "src")
    quant.quantize(src, tmp_path / "w4", method="rtn", bits=4, group_size=32, dtype="float32", progress=False)
    model, _ = quant.load_any(tmp_path / "w4", device="cpu")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    assert_same_tokens_or_near_tie(model, ids, KVCacheConfig(bits=8))
    seq, _ = greedy(model, ids, QuantizedKVCache(model.config, KVCacheConfig(bits=4, window=2)), n=4)
    assert seq.shape == (1, 14)


def test_with_kv_cache_makes_generate_use_a_fresh_quantized_cache_each_call():
    model = with_kv_cache(tiny_model("qwen2"), "int8")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the cache passed by the name generate takes (no deprecation)
        a = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=257, return_dict_in_generate=True)
        b = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=257, return_dict_in_generate=True)
    assert isinstance(a.past_key_values, QuantizedKVCache) and a.past_key_values is not b.past_key_values
    assert torch.equal(a.sequences, b.sequences)


def test_beam_search_reorders_the_quantized_cache():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=257,
                         **{cache_keyword(model): QuantizedKVCache(model.config, KVCacheConfig(bits=8, window=2))})
    want = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=257)
    assert out.shape == want.shape


# -- calibration --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["qwen3", "phi3"])  # qwen3: k-norm before RoPE; phi3: fused qkv
def test_key_ranges_are_those_of_the_keys_as_cached(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    calib = collect_key_ranges(model, ids, batch_size=2)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{cache_keyword(model): cache}, use_cache=True)
    for i, layer in enumerate(cache.layers):
        assert torch.allclose(calib.key_min[i], layer.keys.amin(dim=(0, 2)), atol=1e-5)
        assert torch.allclose(calib.key_max[i], layer.keys.amax(dim=(0, 2)), atol=1e-5)
    assert calib.n_tokens == 48


def test_calibration_file_round_trips_and_is_checked_against_the_model(tmp_path):
    model = tiny_model("llama")
    calib = collect_key_ranges(model, torch.randint(0, 256, (2, 16)))
    loaded = KVCalibration.load(calib.save(tmp_path / "c.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.key_max, calib.key_max)) and loaded.model_type == "llama"
    with pytest.raises(QtoolError, match="calibrate this model"):
        QuantizedKVCache(tiny_model("opt").config, KVCacheConfig(bits=4, keys="channel", calibration=loaded))  # 4 KV heads
    qwen2 = tiny_model("qwen2").config  # the same layers, heads and channels as the llama: only its type differs
    with pytest.raises(QtoolError, match="was calibrated on a llama model, but this is a qwen2 model"):
        QuantizedKVCache(qwen2, KVCacheConfig(bits=4, keys="channel", calibration=loaded))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QtoolError, match="junk.safetensors"):
        KVCalibration.load(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 3}, "int8 or int4"),
    ({"keys": "head"}, "'token' or 'channel'"),
    ({"window": -1}, "--kv-window"),
    ({"keys": "channel"}, "--kv-calib"),
])
def test_bad_options_get_clear_errors(kwargs, match):
    with pytest.raises(QtoolError, match=match):
        KVCacheConfig(**kwargs)


# -- perplexity through the cache -----------------------------------------------------------------------
def test_fp_cache_perplexity_equals_the_no_cache_perplexity():
    model, tok = tiny_model("llama"), byte_tokenizer()
    want = quant.perplexity(model, tok, TEXT, seqlen=64).ppl
    assert kv_perplexity(model, tok, TEXT, None, seqlen=64).ppl == pytest.approx(want, rel=1e-5)
    assert kv_perplexity(model, tok, TEXT, None, seqlen=64, chunk=5).ppl == pytest.approx(want, rel=1e-5)


def test_kv_perplexity_feels_the_quantization_and_is_chunk_independent_without_a_window():
    model, tok = tiny_model("llama"), byte_tokenizer()
    fp = kv_perplexity(model, tok, TEXT, None, seqlen=64).nll
    int8 = kv_perplexity(model, tok, TEXT, KVCacheConfig(bits=8), seqlen=64).nll
    int4 = kv_perplexity(model, tok, TEXT, KVCacheConfig(bits=4), seqlen=64).nll
    assert int8 != fp and abs(int8 - fp) < abs(int4 - fp)
    chunked = kv_perplexity(model, tok, TEXT, KVCacheConfig(bits=4), seqlen=64, chunk=7).nll
    assert chunked == pytest.approx(int4, rel=1e-5)


def test_a_kv_window_that_holds_the_whole_text_is_refused():
    """A 26-token text with --kv-window 30 in 64-token windows: nothing was quantized, and the fp cache's number was
    printed under the int4 label (the window was checked against --seqlen alone)."""
    model, tok = tiny_model("llama"), byte_tokenizer()
    short = "The quick brown fox jumps."
    with pytest.raises(QtoolError, match="--kv-window 30 keeps every earlier token of a 26-token window"):
        kv_perplexity(model, tok, short, KVCacheConfig(bits=4, window=30), seqlen=64)
    fp = kv_perplexity(model, tok, short, None, seqlen=64).nll
    assert kv_perplexity(model, tok, short, KVCacheConfig(bits=4, window=8), seqlen=64).nll != fp


def test_the_kv_paths_pass_the_cache_by_the_name_the_model_takes_it(tmp_path):
    """transformers 5.2x renamed past_key_values to cache: the old name printed a deprecation warning on every
    forward of kv calibrate and ppl --kv (and goes away in 5.40)."""
    import warnings

    model, tok = tiny_model("llama"), byte_tokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kv_perplexity(model, tok, TEXT, KVCacheConfig(bits=4), seqlen=64, chunk=16)
        collect_key_ranges(model, torch.randint(0, 256, (2, 16)))
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_kv_perplexity_with_chunk_1_is_token_by_token_decoding():
    model, tok = tiny_model("mistral"), byte_tokenizer()
    kv = KVCacheConfig(bits=4, window=3)
    ids = tok(TEXT[:24], add_special_tokens=False, return_tensors="pt").input_ids
    cache = QuantizedKVCache(model.config, kv)
    with torch.no_grad():
        step = [model(ids[:, t: t + 1], **{cache_keyword(model): cache}, use_cache=True).logits[0, -1]
                for t in range(ids.shape[1])]
    from quant.kv.eval import window_logits
    assert torch.allclose(window_logits(model, ids, kv, chunk=1), torch.stack(step), atol=1e-5)


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_calibrate_then_ppl_with_channel_keys(tmp_path):
    src = save_tiny_model("qwen2", tmp_path / "m")
    (src / "config.json").chmod(0o644)
    mode = (src / "config.json").stat().st_mode & 0o777
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    runner = CliRunner()
    res = runner.invoke(app, ["kv", "calibrate", str(src), "--calib-data", str(data), "--n-samples", "2",
                              "--seqlen", "32"])
    assert res.exit_code == 0, res.output
    assert (src / CALIB_FILENAME).is_file() and calibration_reference(src) == src / CALIB_FILENAME
    assert json.loads((src / "config.json").read_text())["qtool_kv_cache"] == {"key_calibration": CALIB_FILENAME}
    quant.load_any(src)  # the extra config key does not disturb loading
    res = runner.invoke(app, ["ppl", str(src), "--data", str(data), "--seqlen", "64", "--kv", "int4",
                              "--kv-keys", "channel", "--kv-window", "8"])
    assert res.exit_code == 0, res.output
    assert parse_kv("int4", keys="channel", model_dir=src).calibration is not None
    # The calibrated folder is still a source: quantized, its checkpoint is calibrated in turn, and read after it
    assert (src / "config.json").stat().st_mode & 0o777 == mode  # kept (mkstemp's 0600 locked other readers out)
    res = runner.invoke(app, ["rtn", str(src), "--group-size", "32", "-o", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    assert "qtool_kv_cache" not in json.loads((tmp_path / "q" / "config.json").read_text())  # the source's keys
    res = runner.invoke(app, ["kv", "calibrate", str(tmp_path / "q"), "--calib-data", str(data), "--n-samples", "2",
                              "--seqlen", "32"])
    assert res.exit_code == 0, res.output
    for args in (["info", str(tmp_path / "q")], ["ppl", str(tmp_path / "q"), "--data", str(data), "--seqlen", "64",
                                                  "--kv", "int4", "--kv-keys", "channel"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    # A calibrated checkpoint is replaced whole by --overwrite (its calibration is stale for the new weights)
    res = runner.invoke(app, ["rtn", str(src), "--group-size", "32", "-o", str(tmp_path / "q"), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "q" / CALIB_FILENAME).exists()


def test_a_calibration_at_the_top_of_a_folder_is_not_taken_for_weights(tmp_path):
    """Older versions wrote kv_calib.safetensors beside the weights: such a folder still quantizes and loads."""
    src = save_tiny_model("llama", tmp_path / "m")
    calibration = KVCalibration((torch.zeros(2, 16),) * 2, (torch.ones(2, 16),) * 2, "llama", 64)
    calibration.save(src / "kv_calib.safetensors")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "qtool_kv_cache": {"key_calibration": "kv_calib.safetensors"}}))
    quant.quantize(src, tmp_path / "q", method="rtn", bits=4, group_size=32, progress=False)
    quant.load_any(src)
    assert parse_kv("int4", keys="channel", model_dir=src).calibration.num_layers == 2


@pytest.mark.parametrize("out, match", [
    ("{m}/model.safetensors", "top of the model folder"), ("{m}/kv.safetensors", "top of the model folder"),
    ("{m}/config.json", "ending in .safetensors"), ("{m}", "is a folder"), ("{t}/d/", "is a folder"),
    ("{m}/qtool/../tokenizer.json", "ending in .safetensors"), ("{t}/w.safetensors", "not a KV calibration file"),
    ("{t}/old.safetensors", "pass --overwrite"), ("{t}/w.safetensors/x.safetensors", "is not a folder"),
    ("{t}/other/kv.safetensors", "holds another model"),
])
def test_kv_calibrate_never_writes_over_a_model_file_or_into_the_weights(tmp_path, out, match):
    src = save_tiny_model("llama", tmp_path / "m")
    (tmp_path / "d").mkdir()
    save_tiny_model("llama", tmp_path / "other", seed=1)
    shutil.copy(src / "model.safetensors", tmp_path / "w.safetensors")
    KVCalibration((torch.zeros(2, 16),) * 2, (torch.ones(2, 16),) * 2, "llama", 64).save(tmp_path / "old.safetensors")
    before = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()}
    res = CliRunner().invoke(app, ["kv", "calibrate", str(src), "-o", out.format(m=src, t=tmp_path),
                                   "--n-samples", "2", "--seqlen", "32"])
    assert isinstance(res.exception, QtoolError) and match in str(res.exception), res.output
    assert {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()} == before
    assert not [f for f in tmp_path.rglob(".*") if f.is_file()]  # no temporary file left
    res = CliRunner().invoke(app, ["kv", "calibrate", str(src), "-o", str(tmp_path / "old.safetensors"),
                                   "--overwrite", "--n-samples", "2", "--seqlen", "32"])
    assert res.exit_code == 0, res.output


def test_a_calibration_stopped_before_config_json_named_it_is_replaced_by_the_rerun(tmp_path):
    """kill -9 between the two writes left a temporary config.json copy at the top of the folder and an unnamed
    calibration, which the rerun refused ("-o ...: exists; pass --overwrite", an -o never given)."""
    src = save_tiny_model("llama", tmp_path / "m")
    args = ["kv", "calibrate", str(src), "--n-samples", "2", "--seqlen", "32"]
    keys = list(json.loads((src / "config.json").read_text()))
    assert CliRunner().invoke(app, args).exit_code == 0
    assert list(json.loads((src / "config.json").read_text())) == keys + ["qtool_kv_cache"]  # its order kept
    config = json.loads((src / "config.json").read_text())
    del config["qtool_kv_cache"]  # as the killed run left it: the file written, config.json not yet naming it
    (src / "config.json").write_text(json.dumps(config))
    (src / ".config.json.qtool-x1y2").write_text("{}")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert calibration_reference(src) == src / CALIB_FILENAME and not list(src.glob(".config.json*"))
    res = CliRunner().invoke(app, args)  # a named calibration is still replaced only with --overwrite
    assert isinstance(res.exception, QtoolError) and f"{src / CALIB_FILENAME}: exists; pass --overwrite" in str(
        res.exception), res.output
    res = CliRunner().invoke(app, [*args, "-o", ""])  # an unset shell variable
    assert isinstance(res.exception, QtoolError) and "-o is blank" in str(res.exception), res.output


@pytest.mark.parametrize("damage, match", [
    (lambda lo, hi: (lo.fill_(float("nan")), hi), "NaN or inf"), (lambda lo, hi: (hi + 1, lo), "minimum is above"),
    (lambda lo, hi: (lo[0], hi[0]), "shapes"),
])
def test_a_calibration_with_impossible_ranges_is_refused_when_read(tmp_path, damage, match):
    lo, hi = damage(torch.zeros(2, 16), torch.ones(2, 16))
    path = KVCalibration((torch.zeros(2, 16), lo), (torch.ones(2, 16), hi), "llama", 64).save(tmp_path / "k.safetensors")
    with pytest.raises(QtoolError, match=match):
        KVCalibration.load(path)


@pytest.mark.parametrize("entry, match", [("kv.safetensors", "qtool reads"), ({"key_calibration": "gone.safetensors"},
                                                                             "not in the folder"),
                                          ({"key_calibration": "../m2/model.safetensors"}, "a file in the model folder")])
def test_a_config_entry_that_names_no_calibration_is_refused_naming_config_json(tmp_path, entry, match):
    src = save_tiny_model("llama", tmp_path / "m")
    save_tiny_model("llama", tmp_path / "m2")  # a file outside the folder that exists (it was read)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "qtool_kv_cache": entry}))
    res = CliRunner().invoke(app, ["ppl", str(src), "--kv", "int4", "--kv-keys", "channel", "--seqlen", "32"])
    assert isinstance(res.exception, QtoolError) and "config.json" in str(res.exception), res.output
    assert match in str(res.exception)


def test_a_calibration_linked_into_a_hugging_face_cache_snapshot_is_read(tmp_path):
    """A snapshot's files are links to ../../blobs: the reference, resolved, left the folder and was refused."""
    src = save_tiny_model("llama", tmp_path / "snap")
    assert CliRunner().invoke(app, ["kv", "calibrate", str(src), "--n-samples", "2", "--seqlen", "32"]).exit_code == 0
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    calib = src / "qtool" / "kv_calib.safetensors"
    shutil.move(calib, blobs / "abc123")
    calib.symlink_to(blobs / "abc123")
    assert calibration_reference(src) == calib


def test_ppl_names_the_kv_cache_its_number_was_measured_with(tmp_path):
    """The row said only the model: an int4-cache perplexity read like the full-precision one."""
    src = save_tiny_model("llama", tmp_path / "m")
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    rows = {}
    for args in ([], ["--kv", "int4", "--kv-window", "8"]):
        res = CliRunner().invoke(app, ["ppl", str(src), "--data", str(data), "--seqlen", "64", *args])
        assert res.exit_code == 0, res.output
        cells = [c.strip() for c in res.output.strip().splitlines()[-1].split("|")]
        rows[cells[2]] = float(cells[3])
    assert list(rows) == ["full precision", KVCacheConfig(bits=4, window=8).name]
    assert rows["full precision"] != rows[KVCacheConfig(bits=4, window=8).name]


@pytest.mark.parametrize("args,match", [
    (["--kv", "int4", "--kv-window", "64", "--seqlen", "64"], "--kv-window 64 keeps every earlier token"),
    (["--kv", "int4", "--kv-window", "31", "--seqlen", "32"], "--kv-window 31 keeps every earlier token"),
    (["--kv", "int4", "--kv-window", "25", "--seqlen", "32", "--max-tokens", "20"], "of a 20-token window"),
    (["--kv-window", "4"], "add --kv int8 or --kv int4"),
    (["--kv", "int4", "--kv-keys", "channel"], "--kv-calib FILE"),
    (["--kv", "int8", "--kv-window", "-2"], "--kv-window -2"),
    (["--kv", "int8", "--kv-calib", "missing.safetensors", "--kv-keys", "channel"], "missing.safetensors: no such file"),
    (["--kv", "int8", "--kv-calib", ".", "--kv-keys", "channel"], ".: is a folder"),  # said "no such file"
])
def test_cli_bad_kv_options_get_one_clear_sentence(tmp_path, args, match):
    src = save_tiny_model("llama", tmp_path / "m")
    res = CliRunner().invoke(app, ["ppl", str(src), *args])
    assert isinstance(res.exception, QtoolError) and match in str(res.exception), res.output


def test_cli_entry_point_turns_a_kv_mistake_into_status_2(tmp_path):
    src = save_tiny_model("llama", tmp_path / "m")
    res = subprocess.run([sys.executable, "-m", "cli.main", "ppl", str(src), "--kv", "int4", "--kv-keys", "channel"],
                         check=False, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 2 and "--kv-calib FILE" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_int4_kv_on_an_odd_head_dim_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """int4 packs two codes per byte: OPT with 36 / 4 = 9-wide heads is refused from its config.json, in one
    sentence, before its weights load (it was refused at the first forward, after the load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_models import CONFIGS

    src = tmp_path / "opt9"
    config = AutoConfig.for_model("opt", **dict(CONFIGS["opt"], hidden_size=36, word_embed_proj_dim=36))
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    data = tmp_path / "t.txt"
    data.write_text(TEXT)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the KV settings were checked")

    monkeypatch.setattr(quant, "load_any", no_load)
    res = CliRunner().invoke(app, ["ppl", str(src), "--data", str(data), "--seqlen", "32", "--kv", "int4"])
    assert isinstance(res.exception, QtoolError), res.output
    assert "even head_dim; this model's is 9" in str(res.exception)
    with pytest.raises(QtoolError, match="even head_dim"):
        quant.kv.load_with_kv_cache(src, "int4")
