// Host-side interface between the torch binding (binding.cpp) and the kernels
// (w4a16_gemv.cu, w4a16_gemm.cu). Plain pointers and ints only, so the kernels
// compile without any torch header. Layout of the weight tensors: see
// w4a16_common.cuh ("qtool-tile32").
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include <string>

namespace qtool {

enum class Act { kFloat16, kBFloat16 };

struct W4A16Args {
  const void* x;         // [M, K] activations, row-major, dtype Act
  const void* qweight;   // int32 [K/32, N/32, 32, 4]
  const void* scales;    // [G, N] dtype Act, columns permuted per 32
  const uint8_t* zeros;  // [G, N] uint8 permuted like scales, or nullptr (z = 8)
  const void* bias;      // [N] dtype Act, or nullptr
  void* y;               // [M, N] output, dtype Act
  int M, N, K, group_size;
};

// Empty when N, K and group_size fit the tile32 layout, else the constraint that failed.
inline std::string tile32_check(int N, int K, int group_size) {
  if (N % 32) return "N=" + std::to_string(N) + " must be divisible by 32";
  if (K % 32) return "K=" + std::to_string(K) + " must be divisible by 32";
  if (group_size <= 0 || group_size % 32)
    return "group_size " + std::to_string(group_size) + " must be a positive multiple of 32";
  if (K % group_size) return "K=" + std::to_string(K) + " must be divisible by group_size " + std::to_string(group_size);
  return {};
}

// Small-batch kernel (tensor cores with weights as the A operand), M <= kGemvMaxM.
constexpr int kGemvMaxM = 32;
// Empty when the shape is supported, else the constraint that failed, e.g.
// "K=577 must be divisible by group_size 64".
std::string gemv_check(int M, int N, int K, int group_size);
cudaError_t launch_gemv(const W4A16Args& a, Act act, cudaStream_t stream);

// The small-batch kernel with K split over `splits` CTAs per 32 outputs (more CTAs in flight
// where N/32 is about the SM count or less). `partial`: float32 workspace [splits, M, N], any
// contents; `counters`: int32 [N/32], all 0 on entry, left all 0 (one set per stream: two
// concurrent calls must not share them).
constexpr int kGemvMaxSplits = 64;
struct SplitK {
  float* partial = nullptr;
  int* counters = nullptr;
  int splits = 1;
};
std::string gemv_splitk_check(int M, int N, int K, int group_size, int splits);
cudaError_t launch_gemv_splitk(const W4A16Args& a, const SplitK& sk, Act act, cudaStream_t stream);

// Dequantize to W[N, K] in the activation dtype (a.y; a.x, a.bias and a.M unused), for large M
// where dequantize + cuBLAS beats the fused GEMM.
std::string dequant_check(int N, int K, int group_size);
cudaError_t launch_dequant(const W4A16Args& a, Act act, cudaStream_t stream);

// Tiled tensor-core GEMM, any M >= 1.
std::string gemm_check(int M, int N, int K, int group_size);
cudaError_t launch_gemm(const W4A16Args& a, Act act, cudaStream_t stream);

}  // namespace qtool
