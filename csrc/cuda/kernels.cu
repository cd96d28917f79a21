// The CUDA launcher: one thread per sample (grid-stride), running the same per-sample solvers as
// the CPU backend (csrc/core/solvers.h). The grid (thread count, interleaved workspace, what each
// thread does) is csrc/grid.h, which the CPU module can also run on the CPU.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/launch.h"

namespace uhc {
namespace {

constexpr int kBlock = 128;

template <class Acc, class In>
__global__ void __launch_bounds__(kBlock) solve_kernel(Problem<Acc, In> prob, Acc* workspace, int64_t threads) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid < threads) solve_grid_thread(prob, workspace, tid, threads);
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

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
