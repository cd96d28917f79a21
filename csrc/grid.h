// The CUDA launcher's thread grid as plain host/device code: how many threads a call runs, how
// their scratch is interleaved in one workspace, and what each thread does. kernels.cu launches
// it on the GPU; the CPU module can run the same grid on the CPU (solve_grid), so that CI
// exercises the GPU's per-thread code path (strided scratch, grid-stride loop, workspace sizing)
// on machines without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

#include "bindings.h"

namespace uhc {

constexpr int64_t kGridWorkspaceBudget = int64_t(256) << 20;  // bytes of scratch per call, at most
constexpr int64_t kGridMaxThreads = int64_t(1) << 20;

// Threads to launch and workspace bytes for one call; the caller allocates the workspace.
struct Plan {
  int64_t threads;
  int64_t workspace_bytes;
};

inline Plan grid_plan(int method, int dtype, int64_t batch, int64_t N, int64_t K) {
  const int64_t element = dtype == kFloat64 ? 8 : 4;
  const int64_t per_thread = scratch_elements(method, N, K) * element;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(batch, kGridWorkspaceBudget / per_thread));
  threads = std::min<int64_t>(threads, kGridMaxThreads);
  return Plan{threads, threads * per_thread};
}

// Thread `tid` of `threads`: element i of its scratch at workspace[i * threads + tid] (neighbouring
// threads touch neighbouring addresses), samples tid, tid + threads, ...
template <class Acc, class In>
UHC_HD void solve_grid_thread(const Problem<Acc, In>& prob, Acc* workspace, int64_t tid, int64_t threads) {
  const Strided<Acc> work{workspace + tid, threads};
  for (int64_t b = tid; b < prob.batch; b += threads) solve_sample(prob, b, work);
}

}  // namespace uhc
