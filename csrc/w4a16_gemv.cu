// Small-batch W4A16 kernel (decode, M = 1..32): memory-bound by design.
//
// y[M, N] = x[M, K] @ W^T (+ bias), W in the "qtool-tile32" layout documented
// in w4a16_common.cuh (int32 [K/32, N/32, 32, 4]; scales/zeros [G, N] permuted).
//
// "Swap AB": the weights are the mma.m16n8k16 A operand (16 outputs x 16 k) and
// x^T the B operand (16 k x 8 batch rows), so batch 1..8 pads the cheap operand,
// not the weights. Each weight is loaded once (one streamed LDG.128 per lane
// per 32x32 tile, the whole warp reading 512 contiguous bytes), dequantized once
// in registers (LOP3 + HSUB2 + HMUL2 per pair) and used for MB batch blocks of 8.
//
// Grid: one CTA per 32 output features (N/32 CTAs); its kWarps warps split K
// (warp w takes k32 tiles w*kUnroll .. in strides of kWarps*kUnroll, with
// kUnroll 16-byte loads in flight per lane) and reduce through shared memory.
//
// Split K (launch_gemv_splitk): a second grid dimension of S CTAs per strip, each
// over K/S, so that S times more CTAs (and bytes in flight) share the SMs where
// N/32 CTAs leave them under-occupied (N = 4096: 128 CTAs, one per SM). Each CTA
// writes its fp32 partial sums to a workspace [S, M, N]; the last CTA of a strip
// to arrive (a per-strip counter, atomicAdd after a __threadfence) adds the S
// partials in split order (deterministic), adds the bias, writes y, and resets
// its counter to 0 for the next call.
#include "w4a16.h"
#include "w4a16_common.cuh"
#include "w4a16_convert.cuh"

namespace qtool {
namespace {

constexpr int kWarps = 8;
constexpr int kUnroll = 4;

// Reduction slot i of lane l (index idx = 32 i + l) of CTA nb: acc[nh][mb][r] of lane (g, t)
// is output n = 32nb + 16nh + g + 8*(r/2), batch row m = 8mb + 2t + r%2.
struct Slot {
  int i, l, m, n;
};
template <int MB>
__device__ __forceinline__ Slot slot(int idx, int nb) {
  const int i = idx / 32, l = idx % 32;
  const int r = i % 4, mb = (i / 4) % MB, nh = i / (4 * MB);
  return {i, l, mb * 8 + 2 * (l % 4) + (r % 2), nb * 32 + 16 * nh + l / 4 + 8 * (r / 2)};
}

template <typename T, int MB, bool kHasZero, bool kSplit>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(const W4A16Args a, const SplitK sk) {
  const int nb = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int M = a.M, N = a.N, K = a.K;
  const int ktiles = K / 32;
  const size_t kt_stride = size_t(N / 32) * 32;  // uint4 per k32 row of tiles
  const uint4* wq = static_cast<const uint4*>(a.qweight) + size_t(nb) * 32 + lane;
  const T* x = static_cast<const T*>(a.x);
  const uint16_t* scales = static_cast<const uint16_t*>(a.scales);

  float acc[2][MB][4];
#pragma unroll
  for (int nh = 0; nh < 2; ++nh)
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[nh][mb][r] = 0.f;

  int kbeg = 0, kend = ktiles;  // this CTA's k32 tiles
  if constexpr (kSplit) {
    const int per = (ktiles + sk.splits - 1) / sk.splits;
    kbeg = min(ktiles, int(blockIdx.y) * per);
    kend = min(ktiles, kbeg + per);
  }
  for (int kt0 = kbeg + warp * kUnroll; kt0 < kend; kt0 += kWarps * kUnroll) {
    uint4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (kt0 + u < kend) w[u] = load_stream16(wq + size_t(kt0 + u) * kt_stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (kt0 + u >= kend) break;
      const int k0 = (kt0 + u) * 32;
      // Four scales / zeros of this lane: n = g, g+8, g+16, g+24 of the strip.
      const size_t prow = size_t(k0 / a.group_size) * N + size_t(nb) * 32 + g * 4;
      const uint2 sv = *reinterpret_cast<const uint2*>(scales + prow);
      uint32_t zv = 0x08080808u;  // symmetric: z = 8
      if constexpr (kHasZero) zv = __ldg(reinterpret_cast<const uint32_t*>(a.zeros + prow));
      RowParams rp[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) rp[j] = row_params<T>(sv, zv, j);
      // B fragments: b[kh][mb] = x[mb*8+g, k0+16kh+2t .. +1] and [.. +8 .. +9].
      uint32_t b[2][MB][2];
#pragma unroll
      for (int kh = 0; kh < 2; ++kh)
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          const int row = mb * 8 + g;
          b[kh][mb][0] = b[kh][mb][1] = 0u;
          if (row < M) {
            const uint32_t* xp = reinterpret_cast<const uint32_t*>(x + size_t(row) * K + k0 + 16 * kh + 2 * t);
            b[kh][mb][0] = __ldg(xp);
            b[kh][mb][1] = __ldg(xp + 4);  // +8 elements
          }
        }
      const uint32_t words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
      for (int kh = 0; kh < 2; ++kh)
#pragma unroll
        for (int nh = 0; nh < 2; ++nh) {
          uint32_t p[4];
          dequant_word<T>(words[2 * kh + nh], rp[2 * nh], rp[2 * nh + 1], p);
          // A fragment (rows = outputs): a0 (g, k lo) a1 (g+8, k lo) a2 (g, k hi) a3 (g+8, k hi).
          const uint32_t af[4] = {p[0], p[2], p[1], p[3]};
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) mma_16816<T>(acc[nh][mb], af, b[kh][mb][0], b[kh][mb][1]);
        }
    }
  }

  // Reduce the kWarps partial sums (slot<MB> says which output each holds).
  constexpr int kVals = 2 * MB * 4;
  __shared__ float red[kWarps][kVals][32];
#pragma unroll
  for (int nh = 0; nh < 2; ++nh)
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int r = 0; r < 4; ++r) red[warp][(nh * MB + mb) * 4 + r][lane] = acc[nh][mb][r];
  __syncthreads();
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const size_t plane = size_t(M) * N;  // one split's partial sums in the workspace
  auto warps_sum = [&](int i, int l) {
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) sum += red[wi][i][l];
    return sum;
  };
  if constexpr (kSplit) {
    for (int idx = threadIdx.x; idx < kVals * 32; idx += kWarps * 32) {
      const Slot o = slot<MB>(idx, nb);
      if (o.m < M) __stcg(sk.partial + blockIdx.y * plane + size_t(o.m) * N + o.n, warps_sum(o.i, o.l));
    }
    __threadfence();  // this CTA's partials are visible device-wide before it is counted
    __syncthreads();
    __shared__ bool last;
    if (threadIdx.x == 0) last = atomicAdd(sk.counters + nb, 1) == sk.splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
  }
  for (int idx = threadIdx.x; idx < kVals * 32; idx += kWarps * 32) {
    const Slot o = slot<MB>(idx, nb);
    if (o.m >= M) continue;
    float sum = 0.f;
    if constexpr (kSplit) {
      for (int s = 0; s < sk.splits; ++s) sum += __ldcg(sk.partial + s * plane + size_t(o.m) * N + o.n);
    } else {
      sum = warps_sum(o.i, o.l);
    }
    if (bias != nullptr) sum += to_float(bias[o.n]);
    y[size_t(o.m) * N + o.n] = from_float<T>(sum);
  }
  if constexpr (kSplit) {
    if (threadIdx.x == 0) sk.counters[nb] = 0;  // ready for the next call on this stream
  }
}

template <typename T, int MB, bool kSplit>
cudaError_t launch_mb(const W4A16Args& a, const SplitK& sk, cudaStream_t stream) {
  const dim3 grid(a.N / 32, kSplit ? sk.splits : 1), block(kWarps * 32);
  if (a.zeros != nullptr)
    gemv_kernel<T, MB, true, kSplit><<<grid, block, 0, stream>>>(a, sk);
  else
    gemv_kernel<T, MB, false, kSplit><<<grid, block, 0, stream>>>(a, sk);
  return cudaGetLastError();
}

template <typename T, bool kSplit>
cudaError_t launch_typed(const W4A16Args& a, const SplitK& sk, cudaStream_t stream) {
  if (a.M <= 8) return launch_mb<T, 1, kSplit>(a, sk, stream);
  if (a.M <= 16) return launch_mb<T, 2, kSplit>(a, sk, stream);
  return launch_mb<T, 4, kSplit>(a, sk, stream);
}

}  // namespace

std::string gemv_check(int M, int N, int K, int group_size) {
  if (M < 1 || M > kGemvMaxM) return "M=" + std::to_string(M) + " must be in [1, " + std::to_string(kGemvMaxM) + "]";
  return tile32_check(N, K, group_size);
}

cudaError_t launch_gemv(const W4A16Args& a, Act act, cudaStream_t stream) {
  const SplitK none{};
  return act == Act::kFloat16 ? launch_typed<half, false>(a, none, stream)
                              : launch_typed<__nv_bfloat16, false>(a, none, stream);
}

std::string gemv_splitk_check(int M, int N, int K, int group_size, int splits) {
  if (splits < 1 || splits > kGemvMaxSplits)
    return "splits=" + std::to_string(splits) + " must be in [1, " + std::to_string(kGemvMaxSplits) + "]";
  return gemv_check(M, N, K, group_size);
}

cudaError_t launch_gemv_splitk(const W4A16Args& a, const SplitK& sk, Act act, cudaStream_t stream) {
  return act == Act::kFloat16 ? launch_typed<half, true>(a, sk, stream)
                              : launch_typed<__nv_bfloat16, true>(a, sk, stream);
}

}  // namespace qtool
