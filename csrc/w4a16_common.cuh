// Shared pieces of the W4A16 kernels: the in-memory weight layout, the fused
// int4 -> fp16/bf16 dequantization, and thin PTX wrappers (mma, ldmatrix, cp.async).
//
// ============================================================================
// In-memory weight layout "qtool-tile32" (repacked once at load from the AWQ
// "gemm" or GPTQ checkpoint tensors by quant/kernels/layout.py; the checkpoint
// stays the contract, this layout is the kernels' own):
//
//   W[n, k] = (q[n, k] - z[grp, n]) * s[grp, n],  grp = k / group_size,
//   n in [0, N) output features, k in [0, K) input features.
//
// * qweight: int32 [K/32, N/32, 32 lanes, 4 words]. One "tile" is a 32(k) x
//   32(n) block of codes = 512 bytes = one 16-byte vector per lane of a warp,
//   so a warp reads a tile with one coalesced LDG.128 / LDS.128 / cp.async.
//   Tile (kt, nb) holds k in [32kt, 32kt+32), n in [32nb, 32nb+32).
//   Word w = 2*kh + nh of lane l = 4*g + t (g = l/4, t = l%4) covers the
//   16x16 sub-block k in 32kt + 16kh + [0,16), n in 32nb + 16nh + [0,16), and
//   holds exactly the 8 codes an mma.m16n8k16 fragment of that lane needs:
//       nibble 0: (n = g,   k = 2t)     nibble 4: (n = g,   k = 2t+1)
//       nibble 1: (n = g,   k = 2t+8)   nibble 5: (n = g,   k = 2t+9)
//       nibble 2: (n = g+8, k = 2t)     nibble 6: (n = g+8, k = 2t+1)
//       nibble 3: (n = g+8, k = 2t+8)   nibble 7: (n = g+8, k = 2t+9)
//   (n, k relative to the sub-block; nibble i = bits 4i..4i+3). Nibbles i and
//   i+4 sit in the low and high 16-bit halves at the same shift, so
//   ((w >> 4i) & 0x000F000F) | MAGIC yields two 16-bit floats at once, and the
//   pair (i, i+4) is two consecutive k of one n: exactly one 32-bit fragment
//   register. The same word serves as the B operand (k16 x n8, GEMM: weights
//   are B) and as the A operand (m16 x k16 with m = n, GEMV: "swap AB").
// * scales: [G, N] in the activation dtype, G = K / group_size, columns
//   permuted inside each block of 32: column 32nb + 4g + j holds
//   s[grp, 32nb + 8j + g], so lane (g, t) reads its four scales
//   (n = g, g+8, g+16, g+24) with one 8-byte load.
// * zeros: uint8 [G, N], permuted like the scales (one 4-byte load), or absent
//   (symmetric, z = 8).
//
// Dequantization of a pair: (MAGIC | q) - (MAGIC | z) = q - z exactly (both
// are small integers in a 16-bit float whose unit in the last place is 1),
// then one multiply by the scale in the activation dtype. For fp16 this is
// bit-identical to the reference (q - z) * s rounded to fp16; for bf16 the
// scale is the fp16 checkpoint scale rounded to bf16 (one extra rounding).
// Products are accumulated in fp32 by the tensor cores.
// ============================================================================
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace qtool {

// 16-bit float whose mantissa can hold a 4-bit integer exactly in its low bits:
// fp16 1024.0 (ulp 1 in [1024, 2048)) and bf16 128.0 (ulp 1 in [128, 256)).
template <typename T> struct Magic;
template <> struct Magic<half> { static constexpr uint32_t kBits = 0x6400u; };
template <> struct Magic<__nv_bfloat16> { static constexpr uint32_t kBits = 0x4300u; };

template <typename T> struct Vec2;
template <> struct Vec2<half> { using type = half2; };
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };

template <typename T>
__device__ __forceinline__ typename Vec2<T>::type as_vec2(uint32_t u) {
  return *reinterpret_cast<typename Vec2<T>::type*>(&u);
}
template <typename T>
__device__ __forceinline__ uint32_t as_u32(typename Vec2<T>::type v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// Per-row dequantization parameters of one lane, both as packed pairs:
// zm = (MAGIC | z) in both halves, s = scale in both halves.
struct RowParams {
  uint32_t zm;
  uint32_t s;
};

template <typename T>
__device__ __forceinline__ RowParams make_row_params(uint16_t scale_bits, uint32_t z) {
  RowParams p;
  const uint32_t zm = Magic<T>::kBits | z;
  p.zm = zm | (zm << 16);
  p.s = uint32_t(scale_bits) | (uint32_t(scale_bits) << 16);
  return p;
}

// Parameters of row 8j + g of a 32-row block from lane g's permuted loads: sv = its four 16-bit
// scales (columns 4g .. 4g+3), zv = its four uint8 zeros.
template <typename T>
__device__ __forceinline__ RowParams row_params(const uint2& sv, uint32_t zv, int j) {
  const uint32_t sword = j < 2 ? sv.x : sv.y;
  const uint16_t sbits = static_cast<uint16_t>(sword >> (16 * (j & 1)));
  return make_row_params<T>(sbits, (zv >> (8 * j)) & 0xFFu);
}

// One layout word -> four fragment registers of dequantized weights:
//   out[0] = (row g,   k 2t..2t+1)   out[1] = (row g,   k 2t+8..2t+9)
//   out[2] = (row g+8, k 2t..2t+1)   out[3] = (row g+8, k 2t+8..2t+9)
// lo holds the parameters of row g, hi those of row g+8.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t w, RowParams lo, RowParams hi, uint32_t out[4]) {
  using T2 = typename Vec2<T>::type;
  constexpr uint32_t kMagic2 = Magic<T>::kBits | (Magic<T>::kBits << 16);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const RowParams p = i < 2 ? lo : hi;
    const uint32_t biased = ((w >> (4 * i)) & 0x000F000Fu) | kMagic2;  // one LOP3
    const T2 diff = __hsub2(as_vec2<T>(biased), as_vec2<T>(p.zm));     // q - z, exact
    out[i] = as_u32<T>(__hmul2(diff, as_vec2<T>(p.s)));
  }
}

// d += a * b, m16n8k16, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<half>(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global -> shared copy; when !pred nothing is read and 16 zero bytes are written.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Weights are read exactly once per call: stream them (evict-first in L2).
__device__ __forceinline__ uint4 load_stream16(const uint4* p) { return __ldcs(p); }

}  // namespace qtool
