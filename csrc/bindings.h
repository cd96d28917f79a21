// Argument unpacking shared by the CPU and CUDA pybind11 modules.
//
// The modules bind plain functions taking raw data pointers (as integers), sizes and codes; the
// Python side (uhc_fast/backends/native_launch.py) checks devices, dtypes and shapes first, so the
// extensions never link libtorch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/solve.h"

namespace UHC_NAMESPACE {

// The arguments of one solve call, as Python passes them (uhc_fast/backends/native_launch.py).
struct Args {
  int method;
  int out_dtype;        // kFloat32 or kFloat64: the answers' dtype
  int64_t batch;
  uintptr_t teachers;   // (N,) TeacherInput: each teacher's array, strides, dtype code and kind
  uintptr_t structure;  // the int32 structure buffer (core/structure.h)
  int64_t N, K, nnz, G, E, P;
  uintptr_t weights, system;  // float64: (N,) and (N, N) (mf-lf only)
  double temperature, eps, tol;
  uintptr_t sum_tolerance;    // float64 (4,): per dtype code
  int64_t value_kind, max_iter;
  // outputs: (B, K) soft labels and per sample: int32 iterations, bool converged, residual, step
  // and absolute residual in the answers' dtype; uint64 (N, 4) first failing row per teacher and check
  uintptr_t soft, iterations, converged, residual, step, abs_residual, errors;
};

inline void check(const Args& a) {
  if (a.method < kSD || a.method > kMFLU) throw std::invalid_argument("unknown method code " + std::to_string(a.method));
  if (a.out_dtype != kFloat32 && a.out_dtype != kFloat64) throw std::invalid_argument("out_dtype must be float32 or float64");
  if (a.N < 1 || a.K < 1 || a.nnz < 1) throw std::invalid_argument("N, K and nnz must be positive");
  if (a.G < 1 || a.G > a.K) throw std::invalid_argument("G must be in [1, K]");
  if (a.E < 1 || a.E > a.nnz) throw std::invalid_argument("E must be in [1, nnz]");
  if (a.P < 0) throw std::invalid_argument("P must be >= 0");
  if (a.N > (1 << 15) || a.K > (1 << 30) || a.nnz > (1 << 30)) throw std::invalid_argument("N, K or nnz too large");
  if (a.batch < 0) throw std::invalid_argument("batch must be >= 0");
  if (a.max_iter < 0 || a.max_iter > (1 << 30)) throw std::invalid_argument("max_iter must be in [0, 2^30]");
  if (a.value_kind != kProbs && a.value_kind != kLogits) throw std::invalid_argument("value_kind must be 0 or 1");
}

template <class Out>
Problem<Out> make_problem(const Args& a) {
  Problem<Out> prob{};
  prob.s = Structure::from_buffer(reinterpret_cast<const int32_t*>(a.structure), static_cast<int32_t>(a.N),
                                  static_cast<int32_t>(a.K), static_cast<int32_t>(a.nnz), static_cast<int32_t>(a.G),
                                  static_cast<int32_t>(a.E), static_cast<int32_t>(a.P));
  prob.in.teachers = reinterpret_cast<const TeacherInput*>(a.teachers);
  prob.in.temperature = a.temperature;
  prob.in.eps = a.eps;
  const double* tolerance = reinterpret_cast<const double*>(a.sum_tolerance);
  for (int k = 0; k < 4; ++k) prob.in.sum_tolerance[k] = tolerance[k];
  prob.in.value_kind = static_cast<int>(a.value_kind);
  prob.in.errors = reinterpret_cast<unsigned long long*>(a.errors);
  prob.batch = a.batch;
  prob.weights = reinterpret_cast<const double*>(a.weights);
  prob.system = reinterpret_cast<const double*>(a.system);
  prob.method = a.method;
  prob.tol = a.tol;
  prob.max_iter = static_cast<int>(a.max_iter);
  prob.soft = reinterpret_cast<Out*>(a.soft);
  prob.iterations = reinterpret_cast<int32_t*>(a.iterations);
  prob.converged = reinterpret_cast<bool*>(a.converged);
  prob.residual = reinterpret_cast<Out*>(a.residual);
  prob.step = reinterpret_cast<Out*>(a.step);
  prob.abs_residual = reinterpret_cast<Out*>(a.abs_residual);
  return prob;
}

// Call launch(problem) with the Problem type of the answers' dtype.
template <class Launch>
void dispatch_dtype(const Args& a, Launch&& launch) {
  check(a);
  if (a.out_dtype == kFloat64)
    launch(make_problem<double>(a));
  else
    launch(make_problem<float>(a));
}

}  // namespace UHC_NAMESPACE

// The solve bindings' leading parameters, in Args order, written once for every module: the C++
// parameter list, the Args built from it, and pybind11's keyword names.
#define UHC_SOLVE_PARAMS                                                                                         \
  int method, int out_dtype, int64_t batch, uintptr_t teachers, uintptr_t structure, int64_t N, int64_t K,      \
      int64_t nnz, int64_t G, int64_t E, int64_t P, uintptr_t weights, uintptr_t system, double temperature, double eps,  \
      double tol, uintptr_t sum_tolerance, int64_t value_kind, int64_t max_iter, uintptr_t soft,               \
      uintptr_t iterations, uintptr_t converged, uintptr_t residual, uintptr_t step, uintptr_t abs_residual,   \
      uintptr_t errors
#define UHC_SOLVE_PARAMS_AS_ARGS                                                                                 \
  UHC_NAMESPACE::Args {                                                                                                    \
    method, out_dtype, batch, teachers, structure, N, K, nnz, G, E, P, weights, system, temperature, eps, tol,      \
        sum_tolerance, value_kind, max_iter, soft, iterations, converged, residual, step, abs_residual, errors \
  }
#define UHC_SOLVE_ARGS                                                                                            \
  py::arg("method"), py::arg("out_dtype"), py::arg("batch"), py::arg("teachers"), py::arg("structure"),          \
      py::arg("N"), py::arg("K"), py::arg("nnz"), py::arg("G"), py::arg("E"), py::arg("P"), py::arg("weights"),                \
      py::arg("system"), py::arg("temperature"), py::arg("eps"), py::arg("tol"), py::arg("sum_tolerance"),       \
      py::arg("value_kind"), py::arg("max_iter"), py::arg("soft"), py::arg("iterations"), py::arg("converged"), \
      py::arg("residual"), py::arg("step"), py::arg("abs_residual"), py::arg("errors")
