// uhc_fast._native_cpu's top-k functions (registered by module.cpp): per-sample class sets, one
// sample per OpenMP thread at a time (csrc/core/topk.h). Like solve(), the binding takes raw data
// pointers and sizes; uhc_fast/topk.py checks the tensors and allocates the outputs.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/topk.h"

namespace py = pybind11;

namespace {

template <class Out>
void run_topk(const uhc::TopkProblem<Out>& prob, int64_t total, int64_t kmax, int threads) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    uhc::TopkScratch measure(nullptr, total, prob.N, kmax);
    std::unique_ptr<char[]> buffer(new char[measure.bytes + 64]);
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(buffer.get()) + 63) & ~uintptr_t(63));
    uhc::TopkScratch sc(base, total, prob.N, kmax);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 64)
#endif
    for (int64_t b = 0; b < prob.batch; ++b) uhc::solve_topk_sample(prob, b, sc);
  }
  (void)threads;
}

// See uhc_fast/topk.py (_launch_cpu) for the argument contract.
void topk_solve(int method, int out_dtype, int64_t batch, int64_t N, uintptr_t teachers, uintptr_t weights,
                double alpha, bool alpha_given, int64_t vocab_size, double tol, int64_t max_iter,
                uintptr_t sum_tolerance, int64_t width, uintptr_t ids, uintptr_t soft, uintptr_t union_size,
                uintptr_t disconnected, uintptr_t kept, uintptr_t iterations, uintptr_t converged,
                uintptr_t residual, uintptr_t step, uintptr_t abs_residual, uintptr_t errors, int threads) {
  if (method != uhc::kSD && method != uhc::kCE) throw std::invalid_argument("top-k runs sd and ce only");
  if (out_dtype != uhc::kFloat32 && out_dtype != uhc::kFloat64) throw std::invalid_argument("out_dtype must be float32 or float64");
  if (N < 1 || N > 63) throw std::invalid_argument("top-k takes 1 to 63 teachers, got " + std::to_string(N));
  if (batch < 0 || width < 0 || max_iter < 0 || max_iter > (1 << 30)) throw std::invalid_argument("bad batch, width or max_iter");
  const auto* table = reinterpret_cast<const uhc::TopkTeacher*>(teachers);
  int64_t total = 0, kmax = 1;
  for (int64_t i = 0; i < N; ++i) {
    if (table[i].k < 0 || table[i].ids_dtype < uhc::kIds32 || table[i].ids_dtype > uhc::kIds64 ||
        table[i].values_dtype < uhc::kFloat16 || table[i].values_dtype > uhc::kFloat64 || table[i].kind < uhc::kTopkProbs ||
        table[i].kind > uhc::kTopkLogits)
      throw std::invalid_argument("teacher " + std::to_string(i) + ": bad table row");
    total += table[i].k;
    kmax = std::max<int64_t>(kmax, table[i].k);
  }
  if (total > (int64_t(1) << 28)) throw std::invalid_argument("too many listed ids per sample");
  if (batch == 0) return;
  const double* tolerance = reinterpret_cast<const double*>(sum_tolerance);
  auto fill = [&](auto* out) {
    using Out = std::remove_pointer_t<decltype(out)>;
    uhc::TopkProblem<Out> prob{};
    prob.teachers = table;
    prob.N = static_cast<int>(N);
    prob.batch = batch;
    prob.weights = reinterpret_cast<const double*>(weights);
    prob.alpha = alpha;
    prob.alpha_given = alpha_given;
    prob.vocab_size = vocab_size;
    prob.method = method;
    prob.tol = tol;
    prob.max_iter = static_cast<int>(max_iter);
    for (int k = 0; k < 4; ++k) prob.sum_tolerance[k] = tolerance[k];
    prob.width = width;
    prob.ids = reinterpret_cast<int64_t*>(ids);
    prob.soft = out;
    prob.union_size = reinterpret_cast<int32_t*>(union_size);
    prob.disconnected = reinterpret_cast<bool*>(disconnected);
    prob.kept = reinterpret_cast<Out*>(kept);
    prob.iterations = reinterpret_cast<int32_t*>(iterations);
    prob.converged = reinterpret_cast<bool*>(converged);
    prob.residual = reinterpret_cast<Out*>(residual);
    prob.step = reinterpret_cast<Out*>(step);
    prob.abs_residual = reinterpret_cast<Out*>(abs_residual);
    prob.errors = reinterpret_cast<unsigned long long*>(errors);
    run_topk(prob, std::max<int64_t>(total, 1), kmax, threads < 1 ? 1 : threads);
  };
  if (out_dtype == uhc::kFloat64)
    fill(reinterpret_cast<double*>(soft));
  else
    fill(reinterpret_cast<float*>(soft));
}

}  // namespace

void register_topk(py::module_& m) {
  m.def("topk_solve", &topk_solve,
        "Per-sample class sets: merge each sample's teacher ids and solve sd/ce over the union "
        "(see uhc_fast/topk.py for the argument contract).",
        py::arg("method"), py::arg("out_dtype"), py::arg("batch"), py::arg("N"), py::arg("teachers"),
        py::arg("weights"), py::arg("alpha"), py::arg("alpha_given"), py::arg("vocab_size"), py::arg("tol"),
        py::arg("max_iter"), py::arg("sum_tolerance"), py::arg("width"), py::arg("ids"), py::arg("soft"),
        py::arg("union_size"), py::arg("disconnected"), py::arg("kept"), py::arg("iterations"),
        py::arg("converged"), py::arg("residual"), py::arg("step"), py::arg("abs_residual"), py::arg("errors"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  py::dict checks;
  checks["bad id"] = int(uhc::kBadId), checks["duplicate"] = int(uhc::kDuplicate), checks["not finite"] = int(uhc::kNaN);
  checks["out of range"] = int(uhc::kOutOfRange), checks["no mass"] = int(uhc::kNoMass);
  checks["sum over one"] = int(uhc::kSumOver);
  m.attr("topk_checks") = checks;
}
