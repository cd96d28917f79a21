// The CUDA launcher: one thread per sample (grid-stride), each a one-lane tile of the same solvers
// as the CPU backend (csrc/core/). The grid (thread count, interleaved workspace, what each thread
// does) is csrc/grid.h, which the CPU module can also run on the CPU.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/launch.h"

namespace uhc {
namespace {

constexpr int kBlock = 128;
// Blocks per SM the register budget must allow: the closed forms stay lean (memory-bound); the
// Newton solvers may use up to 255 registers rather than spill (ptxas's own cap spilled them).
constexpr int min_blocks(int method) { return method == kSD || method == kMFLF ? 4 : 1; }

// One kernel per (method, answer dtype): each is sized by its own method's registers.
template <int M, class Out>
__global__ void __launch_bounds__(kBlock, min_blocks(M)) solve_kernel(Problem<Out> prob, double* workspace, int64_t threads) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid < threads) solve_grid_thread<M>(prob, workspace, tid, threads);
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
    with_method(prob.method, [&](auto m) {
      solve_kernel<decltype(m)::value><<<blocks, kBlock, 0, s>>>(prob, reinterpret_cast<double*>(workspace), threads);
    });
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
