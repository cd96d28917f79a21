// The CUDA launcher's grids as plain host/device code. The team methods (team_solve.h: sd, mf-lf a
// warp per sample, ce a block): how many teams a call runs and where their scratch lives (team_plan).
// The others run one thread per sample: how many threads, how their scratch is interleaved in one
// workspace, and what each thread does (a tile of one sample, samples tid, tid + threads, ...).
// kernels.cu launches both on the GPU; the CPU module runs the same grids on the CPU (solve_grid,
// cpu/teams.cpp), so that CI exercises the GPU's code paths (team code, interleaved scratch,
// grid-stride loops, workspace sizing) on machines without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

#include "bindings.h"
#include "core/team_solve.h"

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

constexpr int kTeamExchange = 8;  // doubles of shared memory a block team's reductions use (one a warp)

// A team launch: `teams` (whole blocks of team_shape(method).per_block) over the samples, team t
// taking samples t, t + teams, ...; each with `slots` doubles of scratch in its block's shared
// memory when a block's fit in `shared_per_block` bytes, else in a workspace of `workspace_bytes`.
struct TeamPlan {
  int64_t teams;
  int64_t slots;
  bool shared;
  int64_t workspace_bytes;
};

// The shared memory of one block of `method`'s teams, in bytes.
inline int64_t team_block_bytes(int method, const Structure& s) {
  const TeamShape shape = team_shape(method);
  return (team_slots(method, s) * shape.per_block + (shape.per_block == 1 ? kTeamExchange : 0)) * int64_t(sizeof(double));
}

// resident_teams: how many teams the device holds at once (more would only queue).
inline TeamPlan team_plan(int method, int64_t batch, const Structure& s, int64_t shared_per_block,
                          int64_t resident_teams) {
  TeamPlan p{};
  p.slots = team_slots(method, s);
  const int64_t per_team = p.slots * int64_t(sizeof(double)), round = team_shape(method).per_block;
  p.shared = team_block_bytes(method, s) <= shared_per_block;
  int64_t blocks = std::min((std::max<int64_t>(batch, 1) + round - 1) / round, std::max<int64_t>(resident_teams / round, 1));
  if (!p.shared) blocks = std::min(blocks, std::max<int64_t>(1, kGridWorkspaceBudget / (per_team * round)));
  p.teams = blocks * round;
  p.workspace_bytes = p.shared ? 0 : p.teams * per_team;
  return p;
}

// Thread `tid` of `threads`, method M: element i of its scratch at workspace[i * threads + tid].
template <int M, class Out>
UHC_HD void solve_grid_thread(const Problem<Out>& prob, double* workspace, int64_t tid, int64_t threads) {
  for (int64_t b = tid; b < prob.batch; b += threads) {
    StridedArena arena(workspace + tid, threads);
    solve_tile_as<M, 1, Out>(prob, b, 1, arena);
  }
}

}  // namespace UHC_NAMESPACE
