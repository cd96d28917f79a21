// The CUDA launcher: one thread per sample (grid-stride), running the same per-sample solvers as
// the CPU backend (csrc/core/solvers.h). Each thread's scratch lives in a caller-allocated
// workspace, interleaved across threads so that the threads of a warp read and write adjacent
// addresses.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/launch.h"

namespace uhc {
namespace {

constexpr int kBlock = 128;
constexpr int64_t kWorkspaceBudget = int64_t(256) << 20;  // bytes of scratch per call, at most

template <class Acc, class In>
__global__ void __launch_bounds__(kBlock) solve_kernel(Problem<Acc, In> prob, Acc* workspace, int64_t threads) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= threads) return;
  const Strided<Acc> work{workspace + tid, threads};
  for (int64_t b = tid; b < prob.batch; b += threads) solve_sample(prob, b, work);
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

Plan cuda_plan(int method, int dtype, int64_t batch, int64_t N, int64_t K) {
  const int64_t element = dtype == kFloat64 ? 8 : 4;
  const int64_t per_thread = scratch_elements(method, N, K) * element;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(batch, kWorkspaceBudget / per_thread));
  threads = std::min<int64_t>(threads, int64_t(1) << 20);
  return Plan{threads, threads * per_thread};
}

void cuda_launch(const Args& args, int device, uintptr_t stream, uintptr_t workspace, int64_t threads) {
  if (args.batch == 0) return;
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  // this module links its own (static) CUDA runtime, whose current device is not torch's
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
  dispatch_dtype(args, [&](const auto& prob) {
    using Acc = std::remove_pointer_t<decltype(prob.soft)>;
    using In = std::remove_const_t<std::remove_pointer_t<decltype(prob.values)>>;
    // 16-bit values are widened by the caller: two instantiations per architecture keep nvcc fast
    if constexpr (std::is_same_v<In, float> || std::is_same_v<In, double>) {
      solve_kernel<<<blocks, kBlock, 0, s>>>(prob, reinterpret_cast<Acc*>(workspace), threads);
    } else {
      throw std::invalid_argument("the CUDA kernels take float32 or float64 values");
    }
  });
  check_cuda(cudaGetLastError(), "solve_kernel launch");
}

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  return err == cudaSuccess ? count : -static_cast<int>(err);
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace uhc
