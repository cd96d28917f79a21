// The CUDA launcher. sd and mf-lf: one warp per sample, ce: one block per sample (core/team_solve.h),
// the sample's state in shared memory, its rows read by consecutive lanes. mf-p, mf-lu: one thread
// per sample (grid-stride), each a one-lane tile of the same solvers as the CPU backend
// (csrc/core/). The grids (team_plan; thread count, interleaved workspace, what each thread does)
// are csrc/grid.h, which the CPU module can also run on the CPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

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

// Team `threadIdx.x / lanes` of the block is team blockIdx.x * per_block + that (team_shape); its
// scratch is its slice of the block's shared memory (after a block team's exchange), or of the
// workspace where that is not null. sd and mf-lf: at least 4 blocks per SM, without which ptxas
// caps them at 64 registers and spills the loads each lane keeps in flight (TeamRow::load_held).
// ce: 3, as many as its shared memory allows at K=1000, N=20 (63 KB a block), so that registers
// are not what limits it.
template <int M, class Out>
__global__ void __launch_bounds__(kTeamBlock, M == kCE ? 3 : 4)
    team_kernel(Problem<Out> prob, double* workspace, int64_t slots, int64_t teams) {
  extern __shared__ double shared[];
  constexpr TeamShape shape = team_shape(M);
  const int member = static_cast<int>(threadIdx.x) / shape.lanes;
  const int64_t team_id = int64_t(blockIdx.x) * shape.per_block + member;
  double* own = shared + (shape.per_block == 1 ? kTeamExchange : 0) + member * slots;
  double* scratch = workspace ? workspace + team_id * slots : own;
  auto solve = [&](const auto& team) {
    for (int64_t b = team_id; b < prob.batch; b += teams) solve_sample_by_team<M>(team, prob, b, scratch);
  };
  if constexpr (shape.lanes == 32)
    solve(WarpTeam{static_cast<int>(threadIdx.x) % 32});
  else
    solve(BlockTeam{shared});
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Dynamic shared memory of a team launch: the scratch when it fits a block, else a block team's
// exchange only.
int64_t team_smem(int method, const Structure& s, bool shared) {
  if (shared) return team_block_bytes(method, s);
  return team_shape(method).per_block == 1 ? kTeamExchange * int64_t(sizeof(double)) : 0;
}

// Blocks of team_kernel<M, *> an SM of the current device holds at once with `smem` bytes each, as
// the runtime counts them (registers, shared memory, threads): a grid of more would run a second,
// nearly empty wave that takes as long as the first.
template <int M>
int resident_blocks(int64_t smem) {
  int with_float = 0, with_double = 0;
  check_cuda(cudaFuncSetAttribute(team_kernel<M, float>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
             "team_kernel shared memory");
  check_cuda(cudaFuncSetAttribute(team_kernel<M, double>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
             "team_kernel shared memory");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&with_float, team_kernel<M, float>, kTeamBlock, size_t(smem)),
             "team_kernel occupancy");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&with_double, team_kernel<M, double>, kTeamBlock, size_t(smem)),
             "team_kernel occupancy");
  return std::max(1, std::min(with_float, with_double));  // one plan serves both answer dtypes
}

// The team grid for the current device (`device`): as many blocks as its SMs hold at once.
template <int M>
TeamPlan device_team_plan(int64_t batch, const Structure& s, int device) {
  int sms = 0, optin = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "multiprocessor count");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "shared memory per block");
  const int64_t smem = team_smem(M, s, team_block_bytes(M, s) <= optin);
  const int64_t resident = int64_t(sms) * resident_blocks<M>(smem) * team_shape(M).per_block;
  return team_plan(M, batch, s, optin, resident);
}

}  // namespace

Plan cuda_plan(int method, int64_t batch, const Structure& s, int device) {
  if (!team_method(method)) return grid_plan(method, batch, s);
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  Plan plan{};
  with_method(method, [&](auto m) {
    constexpr int M = decltype(m)::value;
    if constexpr (team_method(M)) {
      const TeamPlan p = device_team_plan<M>(batch, s, device);
      plan = Plan{p.teams, p.workspace_bytes};
    }
  });
  return plan;
}

void cuda_launch(const Args& args, int device, uintptr_t stream, uintptr_t workspace, int64_t threads) {
  if (args.batch == 0) return;
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  // this module links its own (static) CUDA runtime, whose current device is not torch's
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(args, [&](const auto& prob) {
    with_method(prob.method, [&](auto m) {
      constexpr int M = decltype(m)::value;
      using Out = std::remove_pointer_t<decltype(prob.soft)>;
      if constexpr (team_method(M)) {  // `threads`: teams, as cuda_plan gave them
        const TeamPlan p = device_team_plan<M>(args.batch, prob.s, device);  // (sets the shared memory limit)
        constexpr int per_block = team_shape(M).per_block;
        if (threads % per_block != 0) throw std::invalid_argument("teams must fill whole blocks");
        const int64_t smem = team_smem(M, prob.s, p.shared);
        const unsigned blocks = static_cast<unsigned>(threads / per_block);
        team_kernel<M, Out><<<blocks, kTeamBlock, size_t(smem), s>>>(
            prob, p.shared ? nullptr : reinterpret_cast<double*>(workspace), p.slots, threads);
      } else {
        const unsigned blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
        solve_kernel<M><<<blocks, kBlock, 0, s>>>(prob, reinterpret_cast<double*>(workspace), threads);
      }
    });
  });
  check_cuda(cudaGetLastError(), "kernel launch");
}

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  return err == cudaSuccess ? count : -static_cast<int>(err);
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace uhc
