// uhc_fast._native_cpu: the CPU backend. The solvers are compiled once per instruction set
// (cpu/tiles.cpp) and the widest one this processor runs is picked when the module loads
// (UHC_FAST_CPU_ISA overrides it); `isa` and `lanes` say which runs.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "grid.h"

namespace py = pybind11;

// Per-sample class sets (top-k outputs): cpu/topk.cpp.
void register_topk(py::module_& m);
// The CUDA launcher's team grid emulated on the CPU: cpu/teams.cpp.
void register_teams(py::module_& m);

// The per-instruction-set entry points (cpu/tiles.cpp, one namespace each; CMakeLists.txt says which exist).
#define UHC_DECLARE_ISA(name)                        \
  namespace uhc_##name {                             \
  void solve_tiles(const void* args, int threads);   \
  int lanes();                                       \
  }
UHC_DECLARE_ISA(baseline)
#ifdef UHC_HAVE_AVX2
UHC_DECLARE_ISA(avx2)
#endif
#ifdef UHC_HAVE_AVX512
UHC_DECLARE_ISA(avx512)
#endif

namespace {

struct Variant {
  std::string name;
  void (*solve)(const void*, int);
  int (*lanes)();
  bool supported;
};

std::vector<Variant> variants() {
  std::vector<Variant> out{{"baseline", &uhc_baseline::solve_tiles, &uhc_baseline::lanes, true}};
#if defined(UHC_HAVE_AVX2)
  out.push_back({"avx2", &uhc_avx2::solve_tiles, &uhc_avx2::lanes,
                 __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("f16c")});
#endif
#if defined(UHC_HAVE_AVX512)
  out.push_back({"avx512", &uhc_avx512::solve_tiles, &uhc_avx512::lanes,
                 __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("f16c")});
#endif
  return out;
}

// The variant a call runs: `name` if given (it must be supported), else the widest supported one.
const Variant& pick(const std::string& name) {
  static const std::vector<Variant> all = variants();
  if (name.empty()) {
    for (auto it = all.rbegin(); it != all.rend(); ++it)
      if (it->supported) return *it;
  }
  for (const auto& v : all) {
    if (v.name != name) continue;
    if (!v.supported) throw std::invalid_argument("instruction set '" + name + "' is not supported by this processor");
    return v;
  }
  throw std::invalid_argument("instruction set '" + name + "' was not built");
}

std::string default_isa() {
  const char* forced = std::getenv("UHC_FAST_CPU_ISA");
  return pick(forced ? forced : "").name;
}

void solve(UHC_SOLVE_PARAMS, int threads, const std::string& isa) {
  const uhc::Args args = UHC_SOLVE_PARAMS_AS_ARGS;
  uhc::check(args);
  pick(isa.empty() ? default_isa() : isa).solve(&args, threads < 1 ? 1 : threads);
}

// The CUDA launcher's grid (grid.h) run on the CPU: `grid_threads` emulated GPU threads, each
// with its interleaved slice of one workspace, spread over OpenMP threads.
void solve_grid(UHC_SOLVE_PARAMS, int64_t grid_threads, int threads) {
  const uhc::Args args = UHC_SOLVE_PARAMS_AS_ARGS;
  if (grid_threads < 1) throw std::invalid_argument("grid_threads must be >= 1");
  threads = threads < 1 ? 1 : threads;
  uhc::dispatch_dtype(args, [&](const auto& prob) {
    const int64_t slots = uhc::tile_slots(prob.method, prob.s);
    std::vector<double> workspace(static_cast<size_t>(grid_threads * slots), NAN);  // NaN: as cpu/tiles.cpp
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
#endif
    for (int64_t tid = 0; tid < grid_threads; ++tid) {
      uhc::with_method(prob.method, [&](auto m) {
        uhc::solve_grid_thread<decltype(m)::value>(prob, workspace.data(), tid, grid_threads);
      });
    }
  });
  (void)threads;
}

py::tuple grid_plan(int method, int64_t batch, int64_t N, int64_t K, int64_t nnz, int64_t G, int64_t E,
                    int64_t P) {
  const uhc::Plan p = uhc::grid_plan(method, batch, uhc::Structure::of_sizes(N, K, nnz, G, E, P));
  return py::make_tuple(p.threads, p.workspace_bytes);
}

py::dict isas() {
  py::dict out;
  for (const auto& v : variants()) {
    py::dict entry;
    entry["supported"] = v.supported;
    entry["lanes"] = v.lanes();
    out[py::str(v.name)] = entry;
  }
  return out;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_native_cpu, m) {
  m.doc() = "uhc_fast CPU backend: tiles of samples in SIMD lanes over raw pointers, OpenMP over tiles";
  m.def("solve", &solve, "Solve B samples (see uhc_fast/backends/native_launch.py for the argument contract).",
        UHC_SOLVE_ARGS, py::arg("threads"), py::arg("isa") = "", py::call_guard<py::gil_scoped_release>());
  m.def("solve_grid", &solve_grid,
        "solve() through the CUDA launcher's thread grid and interleaved scratch, run on the CPU (for tests).",
        UHC_SOLVE_ARGS, py::arg("grid_threads"), py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def("grid_plan", &grid_plan, "The CUDA launcher's (threads, workspace bytes) for a call.", py::arg("method"),
        py::arg("batch"), py::arg("N"), py::arg("K"), py::arg("nnz"), py::arg("G"), py::arg("E"), py::arg("P"));
  m.def("isas", &isas, "The instruction-set variants built: {name: {supported, lanes}}.");
  m.def("default_isa", &default_isa, "The variant solve() runs (UHC_FAST_CPU_ISA overrides the widest supported).");
  m.def("max_threads", &max_threads, "OpenMP's default thread count (1 without OpenMP).");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  // what tests/test_constants.py compares with uhc_fast.methods, uhc_fast.constants and uhc_fast.problem
  py::dict codes;
  codes["sd"] = int(uhc::kSD), codes["ce"] = int(uhc::kCE), codes["mf-p"] = int(uhc::kMFP);
  codes["mf-lf"] = int(uhc::kMFLF), codes["mf-lu"] = int(uhc::kMFLU);
  m.attr("method_codes") = codes;
  py::dict constants;
  constants["DEFAULT_MAX_ITER"] = uhc::kDefaultMaxIter, constants["ARMIJO"] = uhc::kArmijo;
  constants["MAX_HALVINGS"] = uhc::kMaxHalvings, constants["MAX_LOG_STEP"] = uhc::kMaxLogStep;
  constants["CONVERGED_LOG_STEP"] = uhc::kConvergedLogStep, constants["CHANGE_ROUNDING"] = uhc::kChangeRounding;
  constants["MIN_SCALE"] = uhc::kMinScale;
  m.attr("constants") = constants;
  py::list sections;
  for (const char* name : uhc::kStructureSections) sections.append(name);
  m.attr("structure_sections") = sections;
  m.attr("structure_header") = uhc::kStructureHeader;
  m.attr("prior_teacher_mark") = uhc::kPriorTeacher;
  register_topk(m);
  register_teams(m);
}
