// uhc_fast._native_cpu: the OpenMP launcher. One sample per loop iteration, samples spread over
// threads; each thread owns one scratch buffer for the whole call (no allocation in the loop).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "grid.h"

namespace py = pybind11;

namespace {

template <class Acc, class In>
void launch_cpu(const uhc::Problem<Acc, In>& prob, int threads) {
  const int64_t elements = uhc::scratch_elements(prob.method, prob.s.N, prob.s.K);
  // iteration counts differ between samples: hand out small chunks dynamically
  const bool iterative = prob.method == uhc::kCE || prob.method == uhc::kMFP || prob.method == uhc::kMFLU;
  const int64_t chunk = iterative ? 4 : 64;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<Acc> scratch(static_cast<size_t>(elements));
    const uhc::Dense<Acc> work{scratch.data()};
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)
#endif
    for (int64_t b = 0; b < prob.batch; ++b) uhc::solve_sample(prob, b, work);
  }
  (void)threads;
  (void)chunk;
}

void solve(UHC_SOLVE_PARAMS, int threads) {
  const uhc::Args args = UHC_SOLVE_PARAMS_AS_ARGS;
  threads = std::max(1, threads);
  uhc::dispatch_dtype(args, [threads](const auto& prob) { launch_cpu(prob, threads); });
}

// The CUDA launcher's grid (csrc/grid.h) run on the CPU: `grid_threads` emulated GPU threads, each
// with its interleaved slice of one workspace, spread over OpenMP threads.
void solve_grid(UHC_SOLVE_PARAMS, int64_t grid_threads, int threads) {
  const uhc::Args args = UHC_SOLVE_PARAMS_AS_ARGS;
  if (grid_threads < 1) throw std::invalid_argument("grid_threads must be >= 1");
  threads = std::max(1, threads);
  uhc::dispatch_dtype(args, [&](const auto& prob) {
    using Acc = std::remove_pointer_t<decltype(prob.soft)>;
    std::vector<Acc> workspace(static_cast<size_t>(grid_threads * uhc::scratch_elements(method, N, K)));
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
#endif
    for (int64_t tid = 0; tid < grid_threads; ++tid) uhc::solve_grid_thread(prob, workspace.data(), tid, grid_threads);
  });
  (void)threads;
}

py::tuple grid_plan(int method, int dtype, int64_t batch, int64_t N, int64_t K) {
  const uhc::Plan p = uhc::grid_plan(method, dtype, batch, N, K);
  return py::make_tuple(p.threads, p.workspace_bytes);
}

// The solvers' dense kernels on one system, in place, for tests: "cholesky" factorises A (rows
// `ld` apart) and solves with the factor, "lu" eliminates with partial pivoting. False where the
// factorisation fails (A not positive definite, or exactly singular).
template <class Acc>
bool dense_solve_as(const std::string& kind, uintptr_t A, uintptr_t b, int n, int ld) {
  const uhc::Dense<Acc> a{reinterpret_cast<Acc*>(A)}, x{reinterpret_cast<Acc*>(b)};
  if (kind == "lu") return uhc::lu_solve<Acc>(a, x, n, ld);
  if (kind != "cholesky") throw std::invalid_argument("kind must be 'cholesky' or 'lu', got '" + kind + "'");
  if (ld != uhc::padded(n)) throw std::invalid_argument("cholesky needs ld = padded(n)");
  if (!uhc::cholesky<Acc>(a, n, ld)) return false;
  uhc::cholesky_solve<Acc>(a, x, n, ld);
  return true;
}

bool dense_solve(const std::string& kind, int dtype, uintptr_t A, uintptr_t b, int n, int ld) {
  if (n < 1 || ld < n) throw std::invalid_argument("need 1 <= n <= ld");
  if (dtype == uhc::kFloat64) return dense_solve_as<double>(kind, A, b, n, ld);
  if (dtype == uhc::kFloat32) return dense_solve_as<float>(kind, A, b, n, ld);
  throw std::invalid_argument("dense_solve takes float32 or float64");
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
  m.doc() = "uhc_fast CPU backend: per-sample solvers over raw pointers, OpenMP over samples";
  m.def("solve", &solve, "Solve B packed problems (see uhc_fast/native.py for the argument contract).", UHC_SOLVE_ARGS,
        py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def("solve_grid", &solve_grid,
        "solve() through the CUDA launcher's thread grid and interleaved scratch, run on the CPU (for tests).",
        UHC_SOLVE_ARGS, py::arg("grid_threads"), py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def("grid_plan", &grid_plan, "The CUDA launcher's (threads, workspace bytes) for a call.", py::arg("method"),
        py::arg("dtype"), py::arg("batch"), py::arg("N"), py::arg("K"));
  m.def("dense_solve", &dense_solve, "The solvers' Cholesky / LU kernels on one system, in place (for tests).",
        py::arg("kind"), py::arg("dtype"), py::arg("A"), py::arg("b"), py::arg("n"), py::arg("ld"));
  m.def("padded", &uhc::padded, "Row stride of the solvers' small N x N matrices.", py::arg("n"));
  m.def("max_threads", &max_threads, "OpenMP's default thread count (1 without OpenMP).");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.attr("scratch_elements") = py::cpp_function(&uhc::scratch_elements);
}
