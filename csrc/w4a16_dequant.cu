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
// the tile's 512 contiguous bytes) and its four scales/zeros; word 2kh+nh gives
// rows n = 16nh + g (+8), columns k = 16kh + 2t (+8). The pairs are staged in
// shared memory and written back as 16-byte stores, each row's 64 bytes by four
// lanes: writing the pairs straight from registers (8 rows x 16 bytes per store)
// ran at 1.4-1.7 TB/s on an H200.
#include "w4a16.h"
#include "w4a16_common.cuh"

namespace qtool {
namespace {

constexpr int kWarps = 8;
constexpr int kRowWords = 20;  // 16 words of pairs per tile row + 4 of padding: conflict-free pair stores

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
  __shared__ __align__(16) uint32_t stage[kWarps][32 * kRowWords];
  uint32_t* st = stage[threadIdx.x / 32];
#pragma unroll
  for (int kh = 0; kh < 2; ++kh)
#pragma unroll
    for (int nh = 0; nh < 2; ++nh) {
      uint32_t p[4];
      dequant_word<T>(words[2 * kh + nh], rp[2 * nh], rp[2 * nh + 1], p);
      const int r = 16 * nh + g, c = 8 * kh + t;  // tile row, word (pair) column
      st[r * kRowWords + c] = p[0];
      st[r * kRowWords + c + 4] = p[1];
      st[(r + 8) * kRowWords + c] = p[2];
      st[(r + 8) * kRowWords + c + 4] = p[3];
    }
  __syncwarp();
  uint16_t* out = static_cast<uint16_t*>(a.y);  // W[N, K], 16-bit values; K % 32 == 0 keeps rows 16-byte aligned
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = lane / 4 + 8 * i, c = lane % 4;  // row r, k in [8c, 8c + 8)
    const uint4 v = *reinterpret_cast<const uint4*>(st + r * kRowWords + 4 * c);
    *reinterpret_cast<uint4*>(out + (size_t(nb) * 32 + r) * a.K + size_t(kt) * 32 + 8 * c) = v;
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
