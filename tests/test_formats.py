"""Reference quantization math and the checkpoint layouts: exact round trips and hand-made examples."""
import pytest
import torch

from quant import qmath
from quant.formats import (
    PackedWeight,
    pack_awq_gemm,
    pack_gptq,
    unpack_awq_gemm,
    unpack_gptq,
)
from quant.formats.bitpack import pack_bits_i32, unpack_bits_i32, unpack_codes
from quant.formats.compat import exclusion_keys

GROUPS = [32, 64, 128, -1]


def _random_packed(bits, group_size, out_f=64, in_f=256, seed=0, min_zero=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = qmath.n_groups(in_f, group_size)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.int32)
    zero = torch.randint(min_zero, 2**bits, (out_f, n_groups), generator=g, dtype=torch.int32)
    scale = (torch.rand(out_f, n_groups, generator=g) + 0.01).half()
    return PackedWeight(q, scale, zero, bits, group_size)


@pytest.mark.parametrize("group_size", GROUPS)
def test_awq_gemm_round_trip_is_bit_exact(group_size):
    pw = _random_packed(4, group_size)
    t = pack_awq_gemm(pw)
    assert t["qweight"].shape == (256, 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (qmath.n_groups(256, group_size), 8) and t["scales"].dtype == torch.float16
    back = unpack_awq_gemm(t, group_size)
    assert torch.equal(back.q, pw.q) and torch.equal(back.zero, pw.zero) and torch.equal(back.scale, pw.scale)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_round_trip_is_bit_exact(bits, group_size, checkpoint_format):
    pw = _random_packed(bits, group_size, min_zero=1 if checkpoint_format == "gptq" else 0)
    t = pack_gptq(pw, checkpoint_format)
    assert t["qweight"].shape == (256 * bits // 32, 64)
    back = unpack_gptq(t, bits, group_size, checkpoint_format)
    assert torch.equal(back.q, pw.q) and torch.equal(back.zero, pw.zero) and back.g_idx is None


def test_awq_interleave_matches_documented_order():
    # Output column j holds the value j: nibble i must hold column AWQ_ORDER[i] = [0,2,4,6,1,3,5,7][i].
    q = torch.arange(8, dtype=torch.int32)[:, None].expand(8, 32).contiguous()  # [out=8, in=32]
    pw = PackedWeight(q, torch.ones(8, 1).half(), torch.zeros(8, 1, dtype=torch.int32), 4, 32)
    words = pack_awq_gemm(pw)["qweight"]
    assert words.shape == (32, 1)
    assert (words == 0x75316420).all()


def test_gptq_sequential_and_3bit_packing_by_hand():
    q = (torch.arange(8, dtype=torch.int32) + 1)[None, :].expand(8, 8).contiguous()  # q[out, in]: input row r holds r + 1
    pw = PackedWeight(q, torch.ones(8, 1).half(), torch.full((8, 1), 8, dtype=torch.int32), 4, -1)
    t = pack_gptq(pw)
    assert (t["qweight"] == torch.tensor(0x87654321 - 2**32, dtype=torch.int32)).all()
    assert (t["qzeros"] == 0x77777777).all()  # v1 stores z - 1 = 7 in every nibble
    # 3 bits: value 5 (0b101) at row 10 straddles words 0 and 1 (stream bits 30..32).
    v = torch.zeros(1, 32, dtype=torch.int32)
    v[0, 10] = 5
    assert pack_bits_i32(v, 3).tolist() == [[1 << 30, 1, 0]]
    assert torch.equal(unpack_bits_i32(pack_bits_i32(v, 3), 3), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_read_from_the_words_bytes_are_the_bit_streams_values(bits):
    """unpack_codes (uint8, from the words' bytes for 2/4/8 bits) gives unpack_bits_i32's values: words of every
    bit pattern (negative int32 included), leading dimensions, a count ``n`` short of the words' capacity."""
    g = torch.Generator().manual_seed(bits)
    words = torch.randint(-2**31, 2**31, (3, 5, 6), generator=g, dtype=torch.int64).to(torch.int32)
    for n in (None, 6 * 32 // bits - 3):
        codes = unpack_codes(words, bits, n)
        assert codes.dtype == torch.uint8 and codes.is_contiguous()
        assert torch.equal(codes.to(torch.int32), unpack_bits_i32(words, bits, n))


def test_dequantize_in_place_is_the_formula_for_any_layout_of_the_codes():
    """``(q - zero) * scale`` per group, computed in one buffer, bit for bit the out-of-place formula; codes given
    transposed (not contiguous) and as int32 are not written over."""
    from quant import qmath

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 48), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(48, 2, generator=g).half(), torch.randint(0, 16, (48, 2), generator=g)
    for codes in (q.t(), q.t().contiguous().to(torch.int32), q.t().float()):
        before = codes.clone()
        want = ((codes.float().reshape(48, 2, 32) - zero.float()[..., None]) * scale.float()[..., None]).reshape(48, 64)
        assert torch.equal(qmath.dequantize(codes, scale, zero, 32), want)
        assert torch.equal(codes, before)


def test_v1_refuses_a_zero_point_of_zero():
    pw = _random_packed(4, 32)
    pw.zero[0, 0] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_gptq(pw, "gptq")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_written_by_gptqmodel_with_zero_points_of_zero_reads_exactly(bits):
    """GPTQModel writes asymmetric v1 as the v2 qzeros words minus 0x11111111 (one per field), so a zero point of 0
    borrows from the next field; it reads v1 back by adding the pattern to the word, and transformers reads through
    it. qtool added 1 field by field: every field after a borrow came out one step off."""
    pw = _random_packed(bits, 32)
    pw.zero[::3, ::2] = 0
    v2 = pack_gptq(pw, "gptq_v2")
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    words = (v2["qzeros"].to(torch.int64) - ones) & 0xFFFFFFFF  # GPTQModel's v2 -> v1, borrows included
    v1 = dict(v2, qzeros=torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))
    got = unpack_gptq(v1, bits, 32, "gptq")
    assert torch.equal(got.zero.to(torch.int32), pw.zero.to(torch.int32))
    assert torch.equal(got.dequantize(), pw.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("sym", [False, True])
def test_quantization_error_is_at_most_half_a_step(bits, group_size, sym):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(bits))
    scale, zero = qmath.compute_qparams(w, bits, group_size, sym)
    q = qmath.quantize(w, scale, zero, bits, group_size)
    assert q.min() >= 0 and q.max() < 2**bits
    err = (qmath.dequantize(q, scale, zero, group_size) - w).abs()
    g = qmath.effective_group_size(256, group_size)
    step = scale.repeat_interleave(g, dim=1)
    z = zero.repeat_interleave(g, dim=1)
    # Inside the grid's range every value is within half a step; the rounded zero point and the
    # float16 scale can leave the extremes of a group up to one step outside it.
    inside = (w >= -z * step) & (w <= (2**bits - 1 - z) * step)
    assert (err[inside] <= 0.5 * step[inside] + 1e-6).all()
    assert (err <= step + 1e-6).all()
    if sym:
        assert (zero == 2 ** (bits - 1)).all()


def test_zeros_stay_exact_and_constant_groups_survive():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    out = qmath.fake_quantize(w, 4, 32)
    assert torch.equal(out[0], w[0])
    assert torch.allclose(out[1], w[1], rtol=1e-3)


def test_dequantize_with_g_idx_matches_natural_order():
    pw = _random_packed(4, 32)
    natural = torch.arange(256, dtype=torch.int32) // 32
    assert torch.equal(qmath.dequantize(pw.q, pw.scale, pw.zero, 32, natural), pw.dequantize())


# --- the Format objects: capabilities, buffers, quantization_config written and read back -------------


@pytest.mark.parametrize("name", ["awq", "gptq", "gptq_v2"])
def test_each_format_round_trips_through_its_buffers_and_config(name, tmp_path):
    import json

    from quant.formats import get_format
    from quant.formats.spec import read_spec
    from quant.modules import QuantLinear

    fmt = get_format(name)
    bits = 4 if name == "awq" else 3
    pw = _random_packed(bits, 32, min_zero=fmt.min_zero(False))
    tensors = fmt.pack(pw)
    want = fmt.buffers(256, 64, bits, qmath.n_groups(256, 32))
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == {k: v for k, v in want.items() if k in tensors}
    back = fmt.unpack(tensors, bits, 32)
    assert torch.equal(back.q, pw.q) and torch.equal(back.zero, pw.zero) and torch.equal(back.scale, pw.scale)
    layer = QuantLinear.from_packed(pw, None, fmt)
    assert layer.format is fmt and torch.equal(layer.packed_weight().dequantize(), pw.dequantize())
    qc = fmt.quantization_config(bits, 32, False, False)
    qc.update(exclusion_keys(fmt.quant_method, ["model.layers.0.mlp.down_proj"], ["model.layers.1.mlp.down_proj"]))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    spec = read_spec(tmp_path)
    assert (spec.format, spec.bits, spec.group_size, spec.act_order) == (fmt, bits, 32, False)
    assert spec.skipped == ("model.layers.0.mlp.down_proj",)


def test_formats_say_what_they_cannot_hold():
    from quant.formats import get_format

    awq, v1, v2 = get_format("awq"), get_format("gptq"), get_format("gptq_v2")
    assert "4-bit" in awq.settings_error(3, False, False)
    assert "symmetric" in awq.settings_error(4, True, False)
    assert "act-order" in awq.settings_error(4, False, True)
    assert "divisible by 8" in awq.layer_error(256, 60, 4)
    assert v1.settings_error(3, True, True) is None and "5-bit" in v1.settings_error(5, False, False)
    assert "in_features 48" in v1.layer_error(48, 64, 3)  # 3-bit packs 32 rows per 3 words
    assert (v1.min_zero(False), v1.min_zero(True), v2.min_zero(False)) == (1, 0, 0)
    with pytest.raises(ValueError, match="zero point of 0"):
        v1.pack(_random_packed(4, 32, min_zero=0))

