// Thin torch binding (torch stable C ABI): checks shapes, dtypes and devices,
// says which constraint failed, and launches a kernel on the current stream.
//
// The ops' schemas, CPU kernels and fake (meta) kernels are registered from
// Python (quant/kernels/ops.py); this library adds only the CUDA kernels. It
// uses nothing but torch's stable C symbols, so one source builds against the
// CPU wheel (CI) and the CUDA wheel (the GPU machine).
#include <dlfcn.h>

#include <algorithm>
#include <optional>
#include <string>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "w4a16.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// aoti_torch_get_current_cuda_stream lives in libtorch_cuda, which the CPU
// wheel does not have: look it up at run time instead of linking it.
cudaStream_t current_stream(int32_t device) {
  using Fn = AOTITorchError (*)(int32_t, void**);
  static const Fn fn = [] {
    void* sym = nullptr;
    if (void* lib = dlopen("libtorch_cuda.so", RTLD_NOLOAD | RTLD_LAZY)) sym = dlsym(lib, "aoti_torch_get_current_cuda_stream");
    if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream");
    return reinterpret_cast<Fn>(sym);
  }();
  STD_TORCH_CHECK(fn != nullptr, "qtool: aoti_torch_get_current_cuda_stream not found (is this a CUDA build of torch?)");
  void* stream = nullptr;
  STD_TORCH_CHECK(fn(device, &stream) == AOTI_TORCH_SUCCESS, "qtool: cannot get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_operand(const Tensor& t, const char* name, ScalarType dtype, int32_t device) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == device, "qtool: ", name, " must be on the same CUDA device as the other operands");
  STD_TORCH_CHECK(t.scalar_type() == dtype, "qtool: ", name, " has the wrong dtype");
  STD_TORCH_CHECK(t.is_contiguous(), "qtool: ", name, " must be contiguous");
  STD_TORCH_CHECK(aligned16(t), "qtool: ", name, " must be 16-byte aligned");
}

// The weight operands in the qtool-tile32 layout, checked against K, dtype and device; returns N and the zeros pointer.
struct Weight {
  int64_t N;
  const uint8_t* zeros;
};

Weight check_weight(const Tensor& qweight, const Tensor& scales, const std::optional<Tensor>& zeros, int64_t group_size,
                    int64_t K, ScalarType dt, int32_t dev) {
  check_operand(qweight, "qweight", ScalarType::Int, dev);
  check_operand(scales, "scales", dt, dev);
  STD_TORCH_CHECK(qweight.dim() == 4 && qweight.size(2) == 32 && qweight.size(3) == 4,
                  "qtool: qweight must be int32 [K/32, N/32, 32, 4] (the qtool-tile32 layout)");
  const int64_t N = qweight.size(1) * 32;
  STD_TORCH_CHECK(N > 0 && K > 0, "qtool: empty weight (N=", N, ", K=", K, ")");
  STD_TORCH_CHECK(N <= INT32_MAX && K <= INT32_MAX, "qtool: N=", N, " and K=", K, " must fit in 32 bits");
  STD_TORCH_CHECK(qweight.size(0) * 32 == K, "qtool: qweight covers K=", qweight.size(0) * 32, " but x has K=", K);
  STD_TORCH_CHECK(group_size > 0, "qtool: group_size must be positive (per channel: pass K), got ", group_size);
  STD_TORCH_CHECK(K % group_size == 0, "qtool: K=", K, " must be divisible by group_size ", group_size);
  STD_TORCH_CHECK(scales.dim() == 2 && scales.size(0) == K / group_size && scales.size(1) == N,
                  "qtool: scales must be [K/group_size, N] = [", K / group_size, ", ", N, "]");
  const uint8_t* zp = nullptr;
  if (zeros.has_value()) {
    check_operand(*zeros, "zeros", ScalarType::Byte, dev);
    STD_TORCH_CHECK(zeros->dim() == 2 && zeros->size(0) == K / group_size && zeros->size(1) == N,
                    "qtool: zeros must be uint8 [K/group_size, N] = [", K / group_size, ", ", N, "]");
    zp = static_cast<const uint8_t*>(zeros->data_ptr());
  }
  return {N, zp};
}

qtool::Act act_of(ScalarType dt) { return dt == ScalarType::Half ? qtool::Act::kFloat16 : qtool::Act::kBFloat16; }

enum class Kernel { kGemv, kGemvSplitK, kGemm };

const char* op_name(Kernel kernel) {
  return kernel == Kernel::kGemv ? "w4a16_gemv" : kernel == Kernel::kGemvSplitK ? "w4a16_gemv_splitk" : "w4a16_gemm";
}

// splits and counters: Kernel::kGemvSplitK only (see qtool::SplitK).
Tensor run(Kernel kernel, const Tensor& x, const Tensor& qweight, const Tensor& scales,
           const std::optional<Tensor>& zeros, const std::optional<Tensor>& bias, int64_t group_size,
           int64_t splits = 1, const Tensor* counters = nullptr) {
  STD_TORCH_CHECK(x.is_cuda(), "qtool: x must be a CUDA tensor");
  STD_TORCH_CHECK(x.dim() == 2, "qtool: x must be 2-D [M, K], got ", x.dim(), " dims");
  const ScalarType dt = x.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Half || dt == ScalarType::BFloat16, "qtool: x must be float16 or bfloat16");
  const int32_t dev = x.get_device_index();
  check_operand(x, "x", dt, dev);
  const int64_t M = x.size(0), K = x.size(1);
  const Weight w = check_weight(qweight, scales, zeros, group_size, K, dt, dev);
  const int64_t N = w.N;
  const void* bp = nullptr;
  if (bias.has_value()) {
    check_operand(*bias, "bias", dt, dev);
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "qtool: bias must be [N] with N=", N);
    bp = bias->data_ptr();
  }
  const int splits32 = int(std::min<int64_t>(std::max<int64_t>(splits, 0), 1 << 20));
  const std::string why =
      kernel == Kernel::kGemv     ? qtool::gemv_check(int(M), int(N), int(K), int(group_size))
      : kernel == Kernel::kGemm   ? qtool::gemm_check(int(M), int(N), int(K), int(group_size))
                                  : qtool::gemv_splitk_check(int(M), int(N), int(K), int(group_size), splits32);
  STD_TORCH_CHECK(why.empty(), "qtool: ", op_name(kernel), ": ", why);

  Tensor y = torch::stable::new_empty(x, {M, N});
  torch::stable::accelerator::DeviceGuard guard(dev);
  qtool::W4A16Args args{x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), w.zeros, bp, y.data_ptr(),
                        int(M), int(N), int(K), int(group_size)};
  const cudaStream_t stream = current_stream(dev);
  cudaError_t err;
  if (kernel == Kernel::kGemvSplitK) {
    check_operand(*counters, "counters", ScalarType::Int, dev);
    STD_TORCH_CHECK(counters->dim() == 1 && counters->size(0) >= N / 32,
                    "qtool: counters must be int32 [>= N/32] = [", N / 32, "], all 0");
    Tensor partial = torch::stable::new_empty(x, {splits, M, N}, ScalarType::Float);
    const qtool::SplitK sk{static_cast<float*>(partial.data_ptr()), static_cast<int*>(counters->data_ptr()), splits32};
    err = qtool::launch_gemv_splitk(args, sk, act_of(dt), stream);
  } else {
    err = kernel == Kernel::kGemv ? qtool::launch_gemv(args, act_of(dt), stream)
                                  : qtool::launch_gemm(args, act_of(dt), stream);
  }
  STD_TORCH_CHECK(err == cudaSuccess, "qtool: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

// W[N, K] in the scales' dtype (the activation dtype the layout was built for).
Tensor w4a16_dequant(Tensor qweight, Tensor scales, std::optional<Tensor> zeros, int64_t group_size) {
  STD_TORCH_CHECK(qweight.is_cuda(), "qtool: qweight must be a CUDA tensor");
  const ScalarType dt = scales.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Half || dt == ScalarType::BFloat16, "qtool: scales must be float16 or bfloat16");
  const int32_t dev = qweight.get_device_index();
  STD_TORCH_CHECK(qweight.dim() == 4, "qtool: qweight must be int32 [K/32, N/32, 32, 4] (the qtool-tile32 layout)");
  const int64_t K = qweight.size(0) * 32;
  const Weight w = check_weight(qweight, scales, zeros, group_size, K, dt, dev);
  const std::string why = qtool::dequant_check(int(w.N), int(K), int(group_size));
  STD_TORCH_CHECK(why.empty(), "qtool: w4a16_dequant: ", why);
  Tensor out = torch::stable::new_empty(scales, {w.N, K});
  torch::stable::accelerator::DeviceGuard guard(dev);
  qtool::W4A16Args args{nullptr, qweight.data_ptr(), scales.data_ptr(), w.zeros, nullptr, out.data_ptr(),
                        0, int(w.N), int(K), int(group_size)};
  const cudaError_t err = qtool::launch_dequant(args, act_of(dt), current_stream(dev));
  STD_TORCH_CHECK(err == cudaSuccess, "qtool: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

Tensor w4a16_gemv(Tensor x, Tensor qweight, Tensor scales, std::optional<Tensor> zeros, std::optional<Tensor> bias,
                  int64_t group_size) {
  return run(Kernel::kGemv, x, qweight, scales, zeros, bias, group_size);
}

// counters: int32 [>= N/32] on x's device, all 0, used by one stream at a time (left all 0).
Tensor w4a16_gemv_splitk(Tensor x, Tensor qweight, Tensor scales, std::optional<Tensor> zeros, std::optional<Tensor> bias,
                         int64_t group_size, int64_t splits, Tensor counters) {
  return run(Kernel::kGemvSplitK, x, qweight, scales, zeros, bias, group_size, splits, &counters);
}

Tensor w4a16_gemm(Tensor x, Tensor qweight, Tensor scales, std::optional<Tensor> zeros, std::optional<Tensor> bias,
                  int64_t group_size) {
  return run(Kernel::kGemm, x, qweight, scales, zeros, bias, group_size);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(qtool, CUDA, m) {
  m.impl("w4a16_gemv", TORCH_BOX(&w4a16_gemv));
  m.impl("w4a16_gemv_splitk", TORCH_BOX(&w4a16_gemv_splitk));
  m.impl("w4a16_gemm", TORCH_BOX(&w4a16_gemm));
  m.impl("w4a16_dequant", TORCH_BOX(&w4a16_dequant));
}
