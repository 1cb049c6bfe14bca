// W4A16 weight dequantization for large batches: W[N, K] in the activation
// dtype from the "qtool-tile32" layout (w4a16_common.cuh), for a cuBLAS matmul.
//
// Above some M the fused GEMM loses to "dequantize once, then cuBLAS": the
// dequantization moves N*K/2 bytes in and 2*N*K out (bandwidth-bound, a few tens
// of microseconds for a 7B linear), after which the matmul runs at cuBLAS's
// rate. quant/kernels/dispatch.py picks the crossover; this kernel uses the same
// dequant_word<T> as the fused kernels, so the weights are bit-identical.
//
// One warp per 32x32 tile: lane (g, t) loads its 16-byte vector (the warp reads
// the tile's 512 contiguous bytes), its four scales/zeros, and writes 16 pairs:
// word 2kh+nh gives rows n = 16nh + g (+8), columns k = 16kh + 2t (+8).
#include "w4a16.h"
#include "w4a16_common.cuh"

namespace qtool {
namespace {

constexpr int kWarps = 8;

template <typename T, bool kHasZero>
__global__ void __launch_bounds__(kWarps * 32) dequant_kernel(const W4A16Args a) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int nblocks = a.N / 32;
  const int64_t tile = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;  // tiles are stored [K/32][N/32]
  if (tile >= int64_t(a.K / 32) * nblocks) return;
  const int kt = int(tile / nblocks), nb = int(tile % nblocks);
  const uint4 w = load_stream16(static_cast<const uint4*>(a.qweight) + tile * 32 + lane);
  const size_t prow = size_t(kt * 32 / a.group_size) * a.N + size_t(nb) * 32 + g * 4;
  const uint2 sv = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(a.scales) + prow);
  uint32_t zv = 0x08080808u;  // symmetric: z = 8
  if constexpr (kHasZero) zv = __ldg(reinterpret_cast<const uint32_t*>(a.zeros + prow));
  RowParams rp[4];  // rows g, g+8, g+16, g+24 of the tile
#pragma unroll
  for (int j = 0; j < 4; ++j) rp[j] = row_params<T>(sv, zv, j);
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  uint32_t* out = static_cast<uint32_t*>(a.y);  // pairs of 16-bit values; K is even
  const size_t row_pairs = size_t(a.K) / 2;
#pragma unroll
  for (int kh = 0; kh < 2; ++kh)
#pragma unroll
    for (int nh = 0; nh < 2; ++nh) {
      uint32_t p[4];
      dequant_word<T>(words[2 * kh + nh], rp[2 * nh], rp[2 * nh + 1], p);
      const size_t n = size_t(nb) * 32 + 16 * nh + g;
      const size_t kp = (size_t(kt) * 32 + 16 * kh + 2 * t) / 2;
      out[n * row_pairs + kp] = p[0];
      out[n * row_pairs + kp + 4] = p[1];
      out[(n + 8) * row_pairs + kp] = p[2];
      out[(n + 8) * row_pairs + kp + 4] = p[3];
    }
}

template <typename T>
cudaError_t launch_typed(const W4A16Args& a, cudaStream_t stream) {
  const int64_t tiles = int64_t(a.K / 32) * (a.N / 32);
  const dim3 grid(unsigned((tiles + kWarps - 1) / kWarps)), block(kWarps * 32);
  if (a.zeros != nullptr)
    dequant_kernel<T, true><<<grid, block, 0, stream>>>(a);
  else
    dequant_kernel<T, false><<<grid, block, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

std::string dequant_check(int N, int K, int group_size) { return tile32_check(N, K, group_size); }

cudaError_t launch_dequant(const W4A16Args& a, Act act, cudaStream_t stream) {
  return act == Act::kFloat16 ? launch_typed<half>(a, stream) : launch_typed<__nv_bfloat16>(a, stream);
}

}  // namespace qtool
