// The CUDA launcher's thread grid as plain host/device code: how many threads a call runs, how
// their scratch is interleaved in one workspace, and what each thread does (a tile of one sample,
// samples tid, tid + threads, ...). kernels.cu launches it on the GPU; the CPU module can run the
// same grid on the CPU (solve_grid), so that CI exercises the GPU's per-thread code path
// (interleaved scratch, grid-stride loop, workspace sizing) on machines without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

#include "bindings.h"

namespace UHC_NAMESPACE {

constexpr int64_t kGridWorkspaceBudget = int64_t(256) << 20;  // bytes of scratch per call, at most
constexpr int64_t kGridMaxThreads = int64_t(1) << 20;

// Threads to launch and workspace bytes for one call; the caller allocates the workspace.
struct Plan {
  int64_t threads;
  int64_t workspace_bytes;
};

inline Plan grid_plan(int method, int64_t batch, const Structure& s) {
  const int64_t per_thread = tile_slots(method, s) * int64_t(sizeof(double));
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(batch, kGridWorkspaceBudget / per_thread));
  threads = std::min<int64_t>(threads, kGridMaxThreads);
  return Plan{threads, threads * per_thread};
}

// Thread `tid` of `threads`, method M: element i of its scratch at workspace[i * threads + tid].
template <int M, class Out>
UHC_HD void solve_grid_thread(const Problem<Out>& prob, double* workspace, int64_t tid, int64_t threads) {
  for (int64_t b = tid; b < prob.batch; b += threads) {
    StridedArena arena(workspace + tid, threads);
    solve_tile_as<M, 1, double, Out>(prob, b, 1, arena);
  }
}

}  // namespace UHC_NAMESPACE
