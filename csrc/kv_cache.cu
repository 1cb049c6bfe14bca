// KV-cache quantize-on-append and dequantize-on-read kernels (int8 / int4).
//
// Reference: quant/kv/quantizer.py. Every step below is the reference's float32
// operation in the same order (IEEE division and round-half-even rintf, scale
// rounded to float16 before the codes are computed), so codes, scales and zeros
// match the reference exactly and dequantized values match to the output dtype.
//
// Per token: one warp per row of D <= 256 elements. Lane l holds element pairs
// (2p, 2p+1) for p = l, l+32, ...: a pair is one int4 byte, so packing needs no
// shuffle; min/max reduce with __shfl_xor_sync. Per channel and dequantize:
// elementwise, one thread per element pair (one int4 byte, two int8 bytes).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kv_cache.h"

namespace qtool {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = 256;
constexpr int kMaxPairsPerLane = kKVMaxHeadDim / 64;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ uint32_t quantize_one(float x, float scale, float zero, float maxq) {
  return static_cast<uint32_t>(fminf(fmaxf(rintf(x / scale + zero), 0.f), maxq));
}

// Store the codes of elements (2p, 2p+1) of one row: one int4 byte or two int8 bytes.
template <int BITS>
__device__ __forceinline__ void store_pair(uint8_t* row_codes, int p, uint32_t q0, uint32_t q1) {
  if constexpr (BITS == 4) {
    row_codes[p] = static_cast<uint8_t>(q0 | (q1 << 4));
  } else {
    reinterpret_cast<uchar2*>(row_codes)[p] = make_uchar2(static_cast<uint8_t>(q0), static_cast<uint8_t>(q1));
  }
}

template <int BITS>
__device__ __forceinline__ float2 load_pair(const uint8_t* row_codes, int p) {
  if constexpr (BITS == 4) {
    const uint32_t b = row_codes[p];
    return make_float2(float(b & 0xFu), float(b >> 4));
  } else {
    const uchar2 b = reinterpret_cast<const uchar2*>(row_codes)[p];
    return make_float2(float(b.x), float(b.y));
  }
}

// This thread's element pair of a [rows, D] tensor: its row and pair index p (elements 2p, 2p+1).
__device__ __forceinline__ bool pair_index(const KVArgs& a, int64_t& row, int& p) {
  const int pairs = a.D / 2;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= a.rows * pairs) return false;
  row = i / pairs;
  p = int(i % pairs);
  return true;
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) quantize_per_token_kernel(const KVArgs a) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= a.rows) return;  // whole warps exit together
  const int lane = threadIdx.x % 32;
  const int pairs = a.D / 2;
  const T* x = static_cast<const T*>(a.x) + row * a.D;
  float2 v[kMaxPairsPerLane];
  float mx = 0.f, mn = 0.f;  // the range always contains 0 (integer zero point in [0, maxq])
#pragma unroll
  for (int i = 0; i < kMaxPairsPerLane; ++i) {
    const int p = lane + 32 * i;
    v[i] = make_float2(0.f, 0.f);
    if (p < pairs) {
      v[i] = make_float2(to_float(x[2 * p]), to_float(x[2 * p + 1]));
      mx = fmaxf(mx, fmaxf(v[i].x, v[i].y));
      mn = fminf(mn, fminf(v[i].x, v[i].y));
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, off));
    mn = fminf(mn, __shfl_xor_sync(0xFFFFFFFFu, mn, off));
  }
  const float maxq = float((1 << BITS) - 1);
  const __half s16 = __float2half_rn(fminf((mx - mn) / maxq, 65504.f));
  float scale = __half2float(s16);
  uint16_t sbits = __half_as_ushort(s16);
  if (!(scale > 0.f)) {  // constant-zero row: any positive scale reproduces it; the reference uses 2^-24
    scale = 5.9604644775390625e-8f;
    sbits = 0x0001u;
  }
  const float zero = fminf(fmaxf(rintf(-mn / scale), 0.f), maxq);
  uint8_t* row_codes = a.codes + row * (a.D * BITS / 8);
#pragma unroll
  for (int i = 0; i < kMaxPairsPerLane; ++i) {
    const int p = lane + 32 * i;
    if (p < pairs) store_pair<BITS>(row_codes, p, quantize_one(v[i].x, scale, zero, maxq), quantize_one(v[i].y, scale, zero, maxq));
  }
  if (lane == 0) {
    a.scale[row] = sbits;
    a.zero[row] = static_cast<uint8_t>(zero);
  }
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_per_token_kernel(const KVArgs a) {
  int64_t row;
  int p;
  if (!pair_index(a, row, p)) return;
  const float scale = __half2float(__ushort_as_half(a.scale[row]));
  const float zero = float(a.zero[row]);
  const float2 q = load_pair<BITS>(a.codes + row * (a.D * BITS / 8), p);
  T* out = static_cast<T*>(a.out) + row * a.D + 2 * p;
  out[0] = from_float<T>((q.x - zero) * scale);
  out[1] = from_float<T>((q.y - zero) * scale);
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) quantize_per_channel_kernel(const KVArgs a) {
  int64_t row;
  int p;
  if (!pair_index(a, row, p)) return;
  const int c = int(row / a.T % a.H) * a.D + 2 * p;  // [H, D] index of element 2p
  const T* x = static_cast<const T*>(a.x) + row * a.D + 2 * p;
  const float maxq = float((1 << BITS) - 1);
  store_pair<BITS>(a.codes + row * (a.D * BITS / 8), p, quantize_one(to_float(x[0]), a.cscale[c], a.czero[c], maxq),
                   quantize_one(to_float(x[1]), a.cscale[c + 1], a.czero[c + 1], maxq));
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_per_channel_kernel(const KVArgs a) {
  int64_t row;
  int p;
  if (!pair_index(a, row, p)) return;
  const int c = int(row / a.T % a.H) * a.D + 2 * p;
  const float2 q = load_pair<BITS>(a.codes + row * (a.D * BITS / 8), p);
  T* out = static_cast<T*>(a.out) + row * a.D + 2 * p;
  out[0] = from_float<T>((q.x - a.czero[c]) * a.cscale[c]);
  out[1] = from_float<T>((q.y - a.czero[c + 1]) * a.cscale[c + 1]);
}

enum class Op { kQuantToken, kDequantToken, kQuantChannel, kDequantChannel };

template <typename T, int BITS>
cudaError_t launch_typed(Op op, const KVArgs& a, cudaStream_t s) {
  if (a.rows == 0) return cudaSuccess;
  const int64_t elems = a.rows * (a.D / 2);
  const dim3 grid_pairs(unsigned((elems + kThreads - 1) / kThreads));
  switch (op) {
    case Op::kQuantToken:
      quantize_per_token_kernel<T, BITS><<<unsigned((a.rows + kWarpsPerBlock - 1) / kWarpsPerBlock), kWarpsPerBlock * 32, 0, s>>>(a);
      break;
    case Op::kDequantToken: dequantize_per_token_kernel<T, BITS><<<grid_pairs, kThreads, 0, s>>>(a); break;
    case Op::kQuantChannel: quantize_per_channel_kernel<T, BITS><<<grid_pairs, kThreads, 0, s>>>(a); break;
    case Op::kDequantChannel: dequantize_per_channel_kernel<T, BITS><<<grid_pairs, kThreads, 0, s>>>(a); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bits(Op op, const KVArgs& a, cudaStream_t s) {
  return a.bits == 4 ? launch_typed<T, 4>(op, a, s) : launch_typed<T, 8>(op, a, s);
}

cudaError_t launch(Op op, const KVArgs& a, KVDtype dt, cudaStream_t s) {
  if (!kv_check(a.D, a.bits).empty()) return cudaErrorInvalidValue;
  switch (dt) {
    case KVDtype::kFloat16: return launch_bits<__half>(op, a, s);
    case KVDtype::kBFloat16: return launch_bits<__nv_bfloat16>(op, a, s);
    default: return launch_bits<float>(op, a, s);
  }
}

}  // namespace

std::string kv_check(int D, int bits) {
  if (bits != 4 && bits != 8) return "bits " + std::to_string(bits) + " must be 4 or 8";
  if (D < 2 || D % 2 || D > kKVMaxHeadDim)
    return "head_dim " + std::to_string(D) + " must be even and at most " + std::to_string(kKVMaxHeadDim);
  return "";
}

cudaError_t launch_kv_quantize_per_token(const KVArgs& a, KVDtype dt, cudaStream_t s) { return launch(Op::kQuantToken, a, dt, s); }
cudaError_t launch_kv_dequantize_per_token(const KVArgs& a, KVDtype dt, cudaStream_t s) { return launch(Op::kDequantToken, a, dt, s); }
cudaError_t launch_kv_quantize_per_channel(const KVArgs& a, KVDtype dt, cudaStream_t s) { return launch(Op::kQuantChannel, a, dt, s); }
cudaError_t launch_kv_dequantize_per_channel(const KVArgs& a, KVDtype dt, cudaStream_t s) { return launch(Op::kDequantChannel, a, dt, s); }

}  // namespace qtool
