// Host interface between the KV-cache binding (kv_binding.cpp) and its kernels
// (kv_cache.cu). Plain pointers and ints, no torch headers.
//
// Layouts (the reference is quant/kv/quantizer.py; these kernels reproduce it bit for bit):
//   x, out     [rows, D] row-major (rows = batch * kv_heads * tokens), float32/float16/bfloat16
//   codes      uint8 [rows, D * bits / 8]; int4: byte j = code 2j | code (2j+1) << 4
//   per token: scale float16 [rows], zero uint8 [rows]     x = (q - zero) * scale
//   per channel: scale, zero float32 [H, D]; the channel of row r, column d is (r / T % H, d)
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include <string>

namespace qtool {

enum class KVDtype { kFloat32, kFloat16, kBFloat16 };

constexpr int kKVMaxHeadDim = 256;

struct KVArgs {
  const void* x;        // quantize: input [rows, D]
  void* out;            // dequantize: output [rows, D]
  uint8_t* codes;       // [rows, D * bits / 8] (read by dequantize)
  uint16_t* scale;      // per token: float16 bits [rows]
  uint8_t* zero;        // per token: [rows]
  const float* cscale;  // per channel: [H, D]
  const float* czero;   // per channel: [H, D]
  int64_t rows;
  int D, H, T, bits;
};

// Empty when (D, bits) is supported, else the constraint that failed.
std::string kv_check(int D, int bits);
cudaError_t launch_kv_quantize_per_token(const KVArgs& a, KVDtype dt, cudaStream_t s);
cudaError_t launch_kv_dequantize_per_token(const KVArgs& a, KVDtype dt, cudaStream_t s);
cudaError_t launch_kv_quantize_per_channel(const KVArgs& a, KVDtype dt, cudaStream_t s);
cudaError_t launch_kv_dequantize_per_channel(const KVArgs& a, KVDtype dt, cudaStream_t s);

}  // namespace qtool
