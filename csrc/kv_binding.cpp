// Torch binding of the KV-cache kernels (torch stable C ABI), built into its own
// library, _qtool_kv_kernels.so (quant/kv/kernels.py builds and loads it).
//
// Op schemas, CPU kernels (the reference) and fake kernels are registered from
// Python in quant/kv/kernels.py; this file adds the CUDA kernels:
//   qtool::kv_quantize_per_token(Tensor x, int bits) -> (codes, scale, zero)
//   qtool::kv_dequantize_per_token(Tensor codes, Tensor scale, Tensor zero, int bits, Tensor(a!) out) -> ()
//   qtool::kv_quantize_per_channel(Tensor x, Tensor scale, Tensor zero, int bits) -> codes
//   qtool::kv_dequantize_per_channel(Tensor codes, Tensor scale, Tensor zero, int bits, Tensor(a!) out) -> ()
// x / out are [B, H, T, D] contiguous; shapes of the rest: see kv_cache.h.
#include <dlfcn.h>

#include <string>
#include <tuple>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "kv_cache.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The stream getter lives in libtorch_cuda, absent from the CPU wheel: look it up at run time.
cudaStream_t current_stream(int32_t device) {
  using Fn = AOTITorchError (*)(int32_t, void**);
  static const Fn fn = [] {
    void* sym = nullptr;
    if (void* lib = dlopen("libtorch_cuda.so", RTLD_NOLOAD | RTLD_LAZY)) sym = dlsym(lib, "aoti_torch_get_current_cuda_stream");
    if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream");
    return reinterpret_cast<Fn>(sym);
  }();
  STD_TORCH_CHECK(fn != nullptr, "qtool kv: aoti_torch_get_current_cuda_stream not found (is this a CUDA build of torch?)");
  void* stream = nullptr;
  STD_TORCH_CHECK(fn(device, &stream) == AOTI_TORCH_SUCCESS, "qtool kv: cannot get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

qtool::KVDtype kv_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return qtool::KVDtype::kFloat32;
    case ScalarType::Half: return qtool::KVDtype::kFloat16;
    case ScalarType::BFloat16: return qtool::KVDtype::kBFloat16;
    default: STD_TORCH_CHECK(false, "qtool kv: ", name, " must be float32, float16 or bfloat16");
  }
  return qtool::KVDtype::kFloat32;
}

void check(const Tensor& t, const char* name, int32_t dev, int64_t numel, ScalarType dtype) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == dev, "qtool kv: ", name, " must be on the same CUDA device as the keys/values");
  STD_TORCH_CHECK(t.is_contiguous(), "qtool kv: ", name, " must be contiguous");
  STD_TORCH_CHECK(t.scalar_type() == dtype, "qtool kv: ", name, " has the wrong dtype");
  STD_TORCH_CHECK(t.numel() == numel, "qtool kv: ", name, " has ", t.numel(), " elements, expected ", numel);
}

// [B, H, T, D] fp tensor -> KVArgs with rows, D, H, T filled in.
qtool::KVArgs dims(const Tensor& x, const char* name, int64_t bits) {
  STD_TORCH_CHECK(x.is_cuda(), "qtool kv: ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(x.dim() == 4, "qtool kv: ", name, " must be [batch, kv_heads, tokens, head_dim], got ", x.dim(), " dims");
  STD_TORCH_CHECK(x.is_contiguous(), "qtool kv: ", name, " must be contiguous");
  const std::string why = qtool::kv_check(int(x.size(3)), int(bits));
  STD_TORCH_CHECK(why.empty(), "qtool kv: ", why);
  qtool::KVArgs a{};
  a.rows = x.size(0) * x.size(1) * x.size(2);
  a.D = int(x.size(3));
  a.H = int(x.size(1));
  a.T = int(x.size(2));
  a.bits = int(bits);
  return a;
}

void finish(cudaError_t err) { STD_TORCH_CHECK(err == cudaSuccess, "qtool kv: kernel launch failed: ", cudaGetErrorString(err)); }

std::tuple<Tensor, Tensor, Tensor> kv_quantize_per_token(Tensor x, int64_t bits) {
  qtool::KVArgs a = dims(x, "x", bits);
  const int32_t dev = x.get_device_index();
  Tensor codes = torch::stable::new_empty(x, {x.size(0), x.size(1), x.size(2), x.size(3) * bits / 8}, ScalarType::Byte);
  Tensor scale = torch::stable::new_empty(x, {x.size(0), x.size(1), x.size(2), 1}, ScalarType::Half);
  Tensor zero = torch::stable::new_empty(x, {x.size(0), x.size(1), x.size(2), 1}, ScalarType::Byte);
  a.x = x.data_ptr();
  a.codes = static_cast<uint8_t*>(codes.data_ptr());
  a.scale = static_cast<uint16_t*>(scale.data_ptr());
  a.zero = static_cast<uint8_t*>(zero.data_ptr());
  torch::stable::accelerator::DeviceGuard guard(dev);
  finish(qtool::launch_kv_quantize_per_token(a, kv_dtype(x, "x"), current_stream(dev)));
  return {codes, scale, zero};
}

void kv_dequantize_per_token(Tensor codes, Tensor scale, Tensor zero, int64_t bits, Tensor out) {
  qtool::KVArgs a = dims(out, "out", bits);
  const int32_t dev = out.get_device_index();
  check(codes, "codes", dev, a.rows * a.D * bits / 8, ScalarType::Byte);
  check(scale, "scale", dev, a.rows, ScalarType::Half);
  check(zero, "zero", dev, a.rows, ScalarType::Byte);
  a.out = out.data_ptr();
  a.codes = static_cast<uint8_t*>(codes.data_ptr());
  a.scale = static_cast<uint16_t*>(scale.data_ptr());
  a.zero = static_cast<uint8_t*>(zero.data_ptr());
  torch::stable::accelerator::DeviceGuard guard(dev);
  finish(qtool::launch_kv_dequantize_per_token(a, kv_dtype(out, "out"), current_stream(dev)));
}

Tensor kv_quantize_per_channel(Tensor x, Tensor scale, Tensor zero, int64_t bits) {
  qtool::KVArgs a = dims(x, "x", bits);
  const int32_t dev = x.get_device_index();
  check(scale, "scale", dev, int64_t(a.H) * a.D, ScalarType::Float);
  check(zero, "zero", dev, int64_t(a.H) * a.D, ScalarType::Float);
  Tensor codes = torch::stable::new_empty(x, {x.size(0), x.size(1), x.size(2), x.size(3) * bits / 8}, ScalarType::Byte);
  a.x = x.data_ptr();
  a.codes = static_cast<uint8_t*>(codes.data_ptr());
  a.cscale = static_cast<const float*>(scale.data_ptr());
  a.czero = static_cast<const float*>(zero.data_ptr());
  torch::stable::accelerator::DeviceGuard guard(dev);
  finish(qtool::launch_kv_quantize_per_channel(a, kv_dtype(x, "x"), current_stream(dev)));
  return codes;
}

void kv_dequantize_per_channel(Tensor codes, Tensor scale, Tensor zero, int64_t bits, Tensor out) {
  qtool::KVArgs a = dims(out, "out", bits);
  const int32_t dev = out.get_device_index();
  check(codes, "codes", dev, a.rows * a.D * bits / 8, ScalarType::Byte);
  check(scale, "scale", dev, int64_t(a.H) * a.D, ScalarType::Float);
  check(zero, "zero", dev, int64_t(a.H) * a.D, ScalarType::Float);
  a.out = out.data_ptr();
  a.codes = static_cast<uint8_t*>(codes.data_ptr());
  a.cscale = static_cast<const float*>(scale.data_ptr());
  a.czero = static_cast<const float*>(zero.data_ptr());
  torch::stable::accelerator::DeviceGuard guard(dev);
  finish(qtool::launch_kv_dequantize_per_channel(a, kv_dtype(out, "out"), current_stream(dev)));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(qtool, CUDA, m) {
  m.impl("kv_quantize_per_token", TORCH_BOX(&kv_quantize_per_token));
  m.impl("kv_dequantize_per_token", TORCH_BOX(&kv_dequantize_per_token));
  m.impl("kv_quantize_per_channel", TORCH_BOX(&kv_quantize_per_channel));
  m.impl("kv_dequantize_per_channel", TORCH_BOX(&kv_dequantize_per_channel));
}
