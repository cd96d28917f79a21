// The CUDA launcher's team grid (grid.h: team_plan; core/team_solve.h) emulated on the CPU, for
// tests: `lanes` threads play one team's lanes (a warp's, a block's), meeting at a barrier wherever
// the team would synchronise or exchange values. They walk the grid's teams one after another
// (team t solving samples t, t + teams, ... in its own scratch), so any grid runs on `lanes` threads.
#include <pybind11/pybind11.h>

#include <cmath>
#include <condition_variable>
#include <memory>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "grid.h"

namespace py = pybind11;

namespace {

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0, ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, waiting_ = 0;
  int64_t generation_ = 0;
};

// Lanes meeting at `barrier`, reducing through `slots` (one per lane) between two waits, in lane
// order: every lane gets the same value.
struct Meeting {
  Barrier* barrier;
  double* slots;
  template <class F>
  double reduce(int lane, int size, double x, F f) const {
    slots[lane] = x;
    barrier->wait();
    double out = slots[0];
    for (int k = 1; k < size; ++k) out = f(out, slots[k]);
    barrier->wait();
    return out;
  }
};

// One lane of an emulated team (the Team interface of core/team.h). A team of a multiple of 32
// lanes above 32 has sub-teams of 32 (a block's warps), each with its own meeting.
struct EmulatedTeam {
  static constexpr int kHeld = 2;  // (fewer than a warp's, so that the tests also read rows past them)
  int lane_, size_, group_size_;
  Meeting all, own_group;
  int lane() const { return lane_; }
  int size() const { return size_; }
  void sync() const { all.barrier->wait(); }
  double sum(double x) const { return all.reduce(lane_, size_, x, [](double a, double b) { return a + b; }); }
  double max(double x) const { return all.reduce(lane_, size_, x, [](double a, double b) { return a < b ? b : a; }); }
  bool any(bool p) const { return max(p ? 1.0 : 0.0) > 0; }
  int group() const { return lane_ / group_size_; }
  int groups() const { return size_ / group_size_; }
  int group_lane() const { return lane_ % group_size_; }
  int group_size() const { return group_size_; }
  double group_sum(double x) const {
    return own_group.reduce(group_lane(), group_size_, x, [](double a, double b) { return a + b; });
  }
};

void solve_teams(UHC_SOLVE_PARAMS, int64_t teams, int lanes) {
  const uhc::Args args = UHC_SOLVE_PARAMS_AS_ARGS;
  if (!uhc::team_method(method)) throw std::invalid_argument("solve_teams: method code " + std::to_string(method) + " does not run by teams");
  if (teams < 1) throw std::invalid_argument("teams must be >= 1");
  if (lanes < 1 || lanes > 1024) throw std::invalid_argument("lanes must be in [1, 1024]");
  uhc::dispatch_dtype(args, [&](const auto& prob) {
    const int64_t slots = uhc::team_slots(prob.method, prob.s);
    // the scratch starts as NaN, as the CPU backend's does (cpu/tiles.cpp): the GPU's shared memory
    // starts as whatever was there
    std::vector<double> scratch(static_cast<size_t>(teams * slots), NAN), exchange(static_cast<size_t>(lanes));
    std::vector<double> group_exchange(static_cast<size_t>(lanes));
    const int group_size = lanes > 32 && lanes % 32 == 0 ? 32 : lanes;
    Barrier barrier(lanes);
    std::vector<std::unique_ptr<Barrier>> group_barriers;
    for (int g = 0; g < lanes / group_size; ++g) group_barriers.push_back(std::make_unique<Barrier>(group_size));
    std::vector<std::thread> threads;
    for (int lane = 0; lane < lanes; ++lane) {
      threads.emplace_back([&, lane] {
        const int g = lane / group_size;
        const EmulatedTeam team{lane, lanes, group_size, Meeting{&barrier, exchange.data()},
                                Meeting{group_barriers[g].get(), group_exchange.data() + g * group_size}};
        uhc::with_method(prob.method, [&](auto m) {
          constexpr int M = decltype(m)::value;
          if constexpr (uhc::team_method(M))
            for (int64_t t = 0; t < teams; ++t)
              for (int64_t b = t; b < prob.batch; b += teams)
                uhc::solve_sample_by_team<M>(team, prob, b, scratch.data() + t * slots);
        });
      });
    }
    for (auto& thread : threads) thread.join();
  });
}

py::tuple team_plan(int method, int64_t batch, int64_t N, int64_t K, int64_t nnz, int64_t G, int64_t E, int64_t P,
                    int64_t shared_per_block, int64_t resident_teams) {
  if (!uhc::team_method(method)) throw std::invalid_argument("team_plan: method code " + std::to_string(method) + " does not run by teams");
  const uhc::TeamPlan p = uhc::team_plan(method, batch, uhc::Structure::of_sizes(N, K, nnz, G, E, P), shared_per_block, resident_teams);
  return py::make_tuple(p.teams, p.slots, p.shared, p.workspace_bytes);
}

}  // namespace

void register_teams(py::module_& m) {
  m.def("solve_teams", &solve_teams,
        "solve() through the CUDA launcher's team grid (sd, mf-lf: one warp per sample; ce: one block), emulated on "
        "the CPU with `lanes` threads as a team's lanes (for tests).",
        UHC_SOLVE_ARGS, py::arg("teams"), py::arg("lanes"), py::call_guard<py::gil_scoped_release>());
  m.def("team_plan", &team_plan,
        "The CUDA launcher's team grid for a device with `shared_per_block` bytes of shared memory per block that "
        "holds `resident_teams` teams at once: (teams, scratch doubles per team, in shared memory, workspace bytes).",
        py::arg("method"), py::arg("batch"), py::arg("N"), py::arg("K"), py::arg("nnz"), py::arg("G"), py::arg("E"),
        py::arg("P"), py::arg("shared_per_block"), py::arg("resident_teams"));
  py::dict shapes;  // the method codes the CUDA launcher runs by teams: (lanes a team, teams a block)
  for (int method : {uhc::kSD, uhc::kCE, uhc::kMFP, uhc::kMFLF, uhc::kMFLU})
    if (uhc::team_method(method)) shapes[py::int_(method)] = py::make_tuple(uhc::team_shape(method).lanes, uhc::team_shape(method).per_block);
  m.attr("team_shapes") = shapes;
}
