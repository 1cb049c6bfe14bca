// Tiled tensor-core W4A16 GEMM (prefill and batched decode, any M >= 1).
//
// y[M, N] = x[M, K] @ W^T (+ bias), W in the "qtool-tile32" layout documented
// in w4a16_common.cuh (int32 [K/32, N/32, 32, 4]; scales/zeros [G, N] permuted).
//
// CTA tile kBM x kBN(128) x kBK(64); warps kWarpsM x kWarpsN(4), each owning a
// (16*kMI) x 32 output tile = kMI x 4 mma.m16n8k16 accumulators (fp32).
// A kStages-deep cp.async pipeline stages, per k-tile:
//   A  x[m0 : m0+kBM, k0 : k0+64]   rows of 128 B, 16-byte chunks XOR-swizzled
//                                   (chunk c of row r at c ^ (r % 8)): ldmatrix.x4
//                                   and cp.async are both bank-conflict free;
//                                   rows >= M are zero-filled (cp.async src-size 0);
//   B  2 x 4 weight tiles (k32 x n32, 512 B each) copied verbatim; each warp
//      reads its tile with one conflict-free LDS.128 per lane and dequantizes it
//      in registers straight into B fragments (no ldmatrix needed for B);
//   scales/zeros of the groups holding k0 and k0+32 (group_size % 32 == 0, so
//      every k32 sub-tile lies in one group).
#include "w4a16.h"
#include "w4a16_common.cuh"
#include "w4a16_convert.cuh"

namespace qtool {
namespace {

constexpr int kBK = 64, kBN = 128, kWarpsN = 4, kStages = 4;

template <int kWarpsM, int kMI>
struct GemmCfg {
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kBM = 16 * kMI * kWarpsM;
  static constexpr int kABytes = kBM * kBK * 2;
  static constexpr int kBBytes = (kBK / 32) * (kBN / 32) * 512;
  static constexpr int kSBytes = 2 * kBN * 2;  // two group rows of 16-bit scales
  static constexpr int kZBytes = 2 * kBN;      // two group rows of uint8 zeros
  static constexpr int kStageBytes = kABytes + kBBytes + kSBytes + kZBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
};

template <typename T, int kWarpsM, int kMI, bool kHasZero>
__global__ void __launch_bounds__(GemmCfg<kWarpsM, kMI>::kThreads) gemm_kernel(const W4A16Args a) {
  using Cfg = GemmCfg<kWarpsM, kMI>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_n = warp % kWarpsN, warp_m = warp / kWarpsN;
  const int M = a.M, N = a.N, K = a.K, G = a.group_size;
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * Cfg::kBM;
  const int ktiles = K / kBK;
  const T* x = static_cast<const T*>(a.x);
  const uint4* qw = static_cast<const uint4*>(a.qweight);
  const uint8_t* scales = static_cast<const uint8_t*>(a.scales);

  auto load_stage = [&](int stage, int kt) {
    uint8_t* as = smem + stage * Cfg::kStageBytes;
    uint8_t* bs = as + Cfg::kABytes;
    uint8_t* ss = bs + Cfg::kBBytes;
    uint8_t* zs = ss + Cfg::kSBytes;
    const int k0 = kt * kBK;
    for (int c = tid; c < Cfg::kBM * 8; c += Cfg::kThreads) {
      const int r = c / 8, ch = c % 8;
      const bool ok = m0 + r < M;
      const T* src = ok ? x + size_t(m0 + r) * K + k0 + ch * 8 : x;
      cp_async16(as + r * 128 + ((ch ^ (r & 7)) * 16), src, ok);
    }
    for (int c = tid; c < 256; c += Cfg::kThreads) {
      const int kk = c / 128, nt = (c / 32) % 4, l = c % 32;
      cp_async16(bs + c * 16, qw + (size_t(2 * kt + kk) * (N / 32) + n0 / 32 + nt) * 32 + l, true);
    }
    if (tid < 32) {  // 2 rows x 256 B of scales
      const int row = tid / 16, ch = tid % 16;
      const size_t grp = (k0 + 32 * row) / G;
      cp_async16(ss + row * 256 + ch * 16, scales + (grp * N + n0) * 2 + ch * 16, true);
    } else if (kHasZero && tid < 48) {  // 2 rows x 128 B of zeros
      const int row = (tid - 32) / 8, ch = (tid - 32) % 8;
      const size_t grp = (k0 + 32 * row) / G;
      cp_async16(zs + row * 128 + ch * 16, a.zeros + grp * N + n0 + ch * 16, true);
    }
  };

  float acc[kMI][4][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][j][r] = 0.f;

  auto compute_stage = [&](int stage) {
    const uint8_t* as = smem + stage * Cfg::kStageBytes;
    const uint8_t* bs = as + Cfg::kABytes;
    const uint8_t* ss = bs + Cfg::kBBytes;
    const uint8_t* zs = ss + Cfg::kSBytes;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      // This lane's scales / zeros for n = g, g+8, g+16, g+24 of the warp's 32 columns.
      const uint2 sv = *reinterpret_cast<const uint2*>(ss + kk * 256 + (warp_n * 32 + g * 4) * 2);
      uint32_t zv = 0x08080808u;
      if constexpr (kHasZero) zv = *reinterpret_cast<const uint32_t*>(zs + kk * 128 + warp_n * 32 + g * 4);
      RowParams rp[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint16_t sbits = static_cast<uint16_t>((j < 2 ? sv.x : sv.y) >> (16 * (j & 1)));
        rp[j] = make_row_params<T>(sbits, (zv >> (8 * j)) & 0xFFu);
      }
      const uint4 wv = *reinterpret_cast<const uint4*>(bs + ((kk * 4 + warp_n) * 32 + lane) * 16);
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int kh = 0; kh < 2; ++kh) {
        uint32_t af[kMI][4];
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) {
          const int r = (warp_m * kMI + mi) * 16 + lane % 16;
          const int ch = kk * 4 + kh * 2 + lane / 16;
          ldmatrix_x4(af[mi], as + r * 128 + ((ch ^ (r & 7)) * 16));
        }
#pragma unroll
        for (int nh = 0; nh < 2; ++nh) {
          uint32_t p[4];
          dequant_word<T>(words[2 * kh + nh], rp[2 * nh], rp[2 * nh + 1], p);
#pragma unroll
          for (int mi = 0; mi < kMI; ++mi) {
            mma_16816<T>(acc[mi][2 * nh], af[mi], p[0], p[1]);      // n8 tile: n = 16nh + g
            mma_16816<T>(acc[mi][2 * nh + 1], af[mi], p[2], p[3]);  // n8 tile: n = 16nh + 8 + g
          }
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (for this thread) ...
    __syncthreads();               // ... for all threads, and stage (kt-1) % kStages is free
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next);
    cp_async_commit();
    compute_stage(kt % kStages);
  }
  cp_async_wait<0>();

  // Epilogue: acc[mi][j] = rows (g, g+8) x cols (2t, 2t+1) of n8 tile j.
  using T2 = typename Vec2<T>::type;
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = n0 + warp_n * 32 + 8 * j + 2 * t;
    const float b0 = bias ? to_float(bias[n]) : 0.f, b1 = bias ? to_float(bias[n + 1]) : 0.f;
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + (warp_m * kMI + mi) * 16 + g + 8 * h;
        if (m >= M) continue;
        T2 v;
        v.x = from_float<T>(acc[mi][j][2 * h] + b0);
        v.y = from_float<T>(acc[mi][j][2 * h + 1] + b1);
        *reinterpret_cast<T2*>(y + size_t(m) * N + n) = v;
      }
  }
}

template <typename T, int kWarpsM, int kMI, bool kHasZero>
cudaError_t launch_cfg(const W4A16Args& a, cudaStream_t stream) {
  using Cfg = GemmCfg<kWarpsM, kMI>;
  auto* kernel = gemm_kernel<T, kWarpsM, kMI, kHasZero>;
  // Raise the dynamic shared-memory limit once per instantiation (above 48 KB needs it).
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(a.N / kBN, (a.M + Cfg::kBM - 1) / Cfg::kBM);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, bool kHasZero>
cudaError_t launch_zero(const W4A16Args& a, cudaStream_t stream) {
  // Tile height by M: enough CTAs for small M, more reuse of each weight tile for large M.
  if (a.M <= 16) return launch_cfg<T, 1, 1, kHasZero>(a, stream);
  if (a.M <= 32) return launch_cfg<T, 1, 2, kHasZero>(a, stream);
  if (a.M <= 256) return launch_cfg<T, 2, 2, kHasZero>(a, stream);
  return launch_cfg<T, 2, 4, kHasZero>(a, stream);
}

template <typename T>
cudaError_t launch_typed(const W4A16Args& a, cudaStream_t stream) {
  return a.zeros != nullptr ? launch_zero<T, true>(a, stream) : launch_zero<T, false>(a, stream);
}

}  // namespace

std::string gemm_check(int M, int N, int K, int group_size) {
  if (M < 1) return "M=" + std::to_string(M) + " must be at least 1";
  if (N % kBN) return "N=" + std::to_string(N) + " must be divisible by " + std::to_string(kBN);
  if (K % kBK) return "K=" + std::to_string(K) + " must be divisible by " + std::to_string(kBK);
  if (group_size <= 0 || group_size % 32)
    return "group_size " + std::to_string(group_size) + " must be a positive multiple of 32";
  if (K % group_size) return "K=" + std::to_string(K) + " must be divisible by group_size " + std::to_string(group_size);
  return {};
}

cudaError_t launch_gemm(const W4A16Args& a, Act act, cudaStream_t stream) {
  return act == Act::kFloat16 ? launch_typed<half>(a, stream) : launch_typed<__nv_bfloat16>(a, stream);
}

}  // namespace qtool
