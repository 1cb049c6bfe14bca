"""GPU checks of the KV-cache kernels against the reference (quant/kv/quantizer.py); skip without CUDA.

Tolerance: codes, float16 scales and uint8 zeros must be *identical* to the reference (the kernel does
the reference's float32 operations in the same order: IEEE division, round-half-even, scale rounded to
float16 first). Dequantized values must be identical too ((q - z) * s in float32, then one rounding
to the output dtype). One exception is allowed: a code may differ by one where x / scale + zero lies
within 1e-6 of a rounding boundary (``--use_fast_math`` is not used, so none is expected).
Shapes sweep batch 1..64, kv heads 1..8, tokens 1..4099, head_dim 32..256 (even), every dtype and bits.

Needs the library: ``python -m quant.kernels.build --library kv``.
"""
from __future__ import annotations

import pytest
import torch

from quant.kv import kernels
from quant.kv import quantizer as kq
from quant.kv.cache import cache_keyword

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = ((1, 1, 1, 64), (1, 3, 7, 64), (2, 8, 129, 128), (16, 2, 33, 96), (64, 4, 5, 128), (1, 2, 4099, 256),
          (3, 5, 17, 32), (1, 1, 3, 2))
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(scope="module", autouse=True)
def compiled():
    reason = kernels.load_library()
    assert reason is None, f"KV kernels not loaded: {reason}"


def keys_like(shape, dtype):
    x = torch.randn(shape, device="cuda") * torch.rand(shape[-1], device="cuda") * 4
    x[..., 0] *= 30  # an outlier channel
    if shape[2] > 2:
        x[:, :, 1] = 0  # a constant-zero row
    return x.to(dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_per_token_matches_the_reference(shape, dtype, bits):
    x = keys_like(shape, dtype)
    got = torch.ops.qtool.kv_quantize_per_token(x, bits)
    want = kq.quantize_per_token(x, bits)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), "scales / zeros differ"
    assert torch.equal(got[0], want[0]), "codes differ"
    out = torch.full_like(x, float("nan"))
    torch.ops.qtool.kv_dequantize_per_token(*got, bits, out)
    assert torch.equal(out, kq.dequantize_per_token(*want, bits, dtype))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_per_channel_matches_the_reference(shape, dtype, bits):
    x = keys_like(shape, dtype)
    lo, hi = x.float().amin(dim=(0, 2)) * 0.9, x.float().amax(dim=(0, 2)) * 0.9  # some values clamp
    s, z = kq.channel_qparams(lo, hi, bits)
    codes = torch.ops.qtool.kv_quantize_per_channel(x, s, z, bits)
    assert torch.equal(codes, kq.quantize_per_channel(x, s, z, bits))
    out = torch.full_like(x, float("nan"))
    torch.ops.qtool.kv_dequantize_per_channel(codes, s, z, bits, out)
    assert torch.equal(out, kq.dequantize_per_channel(codes, s, z, bits, dtype))


def test_bad_shapes_say_which_constraint_failed():
    with pytest.raises(RuntimeError, match="head_dim 65 must be even"):
        torch.ops.qtool.kv_quantize_per_token(torch.randn(1, 1, 2, 65, device="cuda", dtype=torch.float16), 8)
    with pytest.raises(RuntimeError, match="bits 3 must be 4 or 8"):
        torch.ops.qtool.kv_quantize_per_token(torch.randn(1, 1, 2, 64, device="cuda", dtype=torch.float16), 3)


def test_the_cache_on_a_gpu_goes_through_the_kernels_and_generates():
    from tiny_models import tiny_model

    from quant.kv import KVCacheConfig, QuantizedKVCache

    assert kernels.cuda_kv_kernels_available()
    model = tiny_model("llama", dtype=torch.float16).cuda()
    cache = QuantizedKVCache(model.config, KVCacheConfig(bits=4, window=2))
    k = torch.randn(2, 2, 9, 16, device="cuda", dtype=torch.float16)
    got, _ = cache.update(k, k, 0)
    want = kq.fake_quantize_per_token(k, 4)
    want[..., -2:, :] = k[..., -2:, :]
    assert torch.equal(got, want)
    ids = torch.randint(0, 256, (4, 12), device="cuda")
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=257,
                         **{cache_keyword(model): QuantizedKVCache(model.config, KVCacheConfig(bits=8))})
    assert out.shape == (4, 20)
