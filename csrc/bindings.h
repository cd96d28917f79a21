// Argument unpacking shared by the CPU and CUDA pybind11 modules.
//
// The modules bind plain functions taking raw data pointers (as integers), sizes and dtype codes;
// the Python side (uhc_fast/native.py) checks devices, dtypes, shapes and contiguity first, so
// the extensions never link libtorch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/solvers.h"

namespace uhc {

// dtype codes of the packed values (uhc_fast/native.py: DTYPE_CODES)
enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// The arguments of one solve call, as Python passes them.
struct Args {
  int method, dtype;
  int64_t batch, N, K, nnz;
  uintptr_t values;
  int64_t row_stride, col_stride;
  uintptr_t offsets, class_index, cls_ptr, cls_col, cls_teacher;  // int32 structure arrays
  int64_t G;
  uintptr_t grp_cls_ptr, grp_cls, grp_ptr, grp_teacher;  // int32 class groups
  uintptr_t weights, gplus;  // accumulation dtype (float64 for float64 values, else float32)
  double tol;
  int64_t max_iter, ce_max_iter;
  uintptr_t soft, iterations, residual;  // outputs: (B, K) and (B,) accumulation dtype, (B,) int32
};

inline void check(const Args& a) {
  if (a.method < kSD || a.method > kMFLU) throw std::invalid_argument("unknown method code " + std::to_string(a.method));
  if (a.dtype < kFloat16 || a.dtype > kFloat64) throw std::invalid_argument("unknown dtype code " + std::to_string(a.dtype));
  if (a.G < 1 || a.G > a.K) throw std::invalid_argument("G must be in [1, K]");
  if (a.N < 1 || a.K < 1 || a.nnz < 1) throw std::invalid_argument("N, K and nnz must be positive");
  if (a.N > (1 << 15) || a.K > (1 << 30) || a.nnz > (1 << 30)) throw std::invalid_argument("N, K or nnz too large");
  if (a.batch < 0) throw std::invalid_argument("batch must be >= 0");
  if (a.max_iter < 0 || a.ce_max_iter < 0 || a.max_iter > (1 << 30) || a.ce_max_iter > (1 << 30))
    throw std::invalid_argument("max_iter must be in [0, 2^30]");
}

template <class Acc, class In>
Problem<Acc, In> make_problem(const Args& a) {
  Problem<Acc, In> prob;
  prob.s = Structure{static_cast<int32_t>(a.N),
                     static_cast<int32_t>(a.K),
                     static_cast<int32_t>(a.nnz),
                     reinterpret_cast<const int32_t*>(a.offsets),
                     reinterpret_cast<const int32_t*>(a.class_index),
                     reinterpret_cast<const int32_t*>(a.cls_ptr),
                     reinterpret_cast<const int32_t*>(a.cls_col),
                     reinterpret_cast<const int32_t*>(a.cls_teacher),
                     static_cast<int32_t>(a.G),
                     reinterpret_cast<const int32_t*>(a.grp_cls_ptr),
                     reinterpret_cast<const int32_t*>(a.grp_cls),
                     reinterpret_cast<const int32_t*>(a.grp_ptr),
                     reinterpret_cast<const int32_t*>(a.grp_teacher)};
  prob.values = reinterpret_cast<const In*>(a.values);
  prob.row_stride = a.row_stride;
  prob.col_stride = a.col_stride;
  prob.batch = a.batch;
  prob.weights = reinterpret_cast<const Acc*>(a.weights);
  prob.gplus = reinterpret_cast<const Acc*>(a.gplus);
  prob.method = a.method;
  prob.tol = static_cast<Acc>(a.tol);
  prob.max_iter = static_cast<int>(a.max_iter);
  prob.ce_max_iter = static_cast<int>(a.ce_max_iter);
  prob.soft = reinterpret_cast<Acc*>(a.soft);
  prob.iterations = reinterpret_cast<int32_t*>(a.iterations);
  prob.residual = reinterpret_cast<Acc*>(a.residual);
  return prob;
}

// Call launch(problem) with the Problem type matching the dtype code.
template <class Launch>
void dispatch_dtype(const Args& a, Launch&& launch) {
  check(a);
  switch (a.dtype) {
    case kFloat16:
      launch(make_problem<float, Half>(a));
      break;
    case kBFloat16:
      launch(make_problem<float, BFloat16>(a));
      break;
    case kFloat32:
      launch(make_problem<float, float>(a));
      break;
    default:
      launch(make_problem<double, double>(a));
      break;
  }
}

}  // namespace uhc

// The solve bindings' leading parameters, in Args order, written once for every module: the C++
// parameter list, the Args built from it, and pybind11's keyword names.
#define UHC_SOLVE_PARAMS                                                                                          \
  int method, int dtype, int64_t batch, int64_t N, int64_t K, int64_t nnz, uintptr_t values, int64_t row_stride,  \
      int64_t col_stride, uintptr_t offsets, uintptr_t class_index, uintptr_t cls_ptr, uintptr_t cls_col,         \
      uintptr_t cls_teacher, int64_t G, uintptr_t grp_cls_ptr, uintptr_t grp_cls, uintptr_t grp_ptr,              \
      uintptr_t grp_teacher, uintptr_t weights, uintptr_t gplus, double tol, int64_t max_iter, int64_t ce_max_iter, \
      uintptr_t soft, uintptr_t iterations, uintptr_t residual
#define UHC_SOLVE_PARAMS_AS_ARGS                                                                                  \
  uhc::Args {                                                                                                     \
    method, dtype, batch, N, K, nnz, values, row_stride, col_stride, offsets, class_index, cls_ptr, cls_col,      \
        cls_teacher, G, grp_cls_ptr, grp_cls, grp_ptr, grp_teacher, weights, gplus, tol, max_iter, ce_max_iter,  \
        soft, iterations, residual                                                                                \
  }
#define UHC_SOLVE_ARGS                                                                                            \
  py::arg("method"), py::arg("dtype"), py::arg("batch"), py::arg("N"), py::arg("K"), py::arg("nnz"),              \
      py::arg("values"), py::arg("row_stride"), py::arg("col_stride"), py::arg("offsets"), py::arg("class_index"), \
      py::arg("cls_ptr"), py::arg("cls_col"), py::arg("cls_teacher"), py::arg("G"), py::arg("grp_cls_ptr"),       \
      py::arg("grp_cls"), py::arg("grp_ptr"), py::arg("grp_teacher"), py::arg("weights"), py::arg("gplus"),       \
      py::arg("tol"), py::arg("max_iter"), py::arg("ce_max_iter"), py::arg("soft"), py::arg("iterations"),        \
      py::arg("residual")
