// uhc_fast._native_cuda: pybind11 bindings of the CUDA launcher. Compiled by the host compiler;
// the kernels live in kernels.cu and the CUDA runtime is linked statically.
#include <pybind11/pybind11.h>

#include "cuda/launch.h"

namespace py = pybind11;

namespace {

void solve(int method, int dtype, int64_t batch, int64_t N, int64_t K, int64_t nnz, uintptr_t values,
           int64_t row_stride, int64_t col_stride, uintptr_t offsets, uintptr_t class_index, uintptr_t cls_ptr,
           uintptr_t cls_col, uintptr_t cls_teacher, int64_t G, uintptr_t grp_cls_ptr, uintptr_t grp_cls, uintptr_t grp_ptr,
           uintptr_t grp_teacher, uintptr_t weights, uintptr_t gplus, double tol, int64_t max_iter,
           int64_t ce_max_iter, uintptr_t soft, uintptr_t iterations, uintptr_t residual, int device,
           uintptr_t stream, uintptr_t workspace, int64_t threads) {
  const uhc::Args args{method, dtype, batch, N, K, nnz, values, row_stride, col_stride, offsets, class_index,
                       cls_ptr, cls_col, cls_teacher, G, grp_cls_ptr, grp_cls, grp_ptr, grp_teacher, weights, gplus, tol,
                       max_iter, ce_max_iter, soft, iterations, residual};
  uhc::cuda_launch(args, device, stream, workspace, threads);
}

py::tuple plan(int method, int dtype, int64_t batch, int64_t N, int64_t K) {
  const uhc::Plan p = uhc::grid_plan(method, dtype, batch, N, K);
  return py::make_tuple(p.threads, p.workspace_bytes);
}

py::tuple device_count() {
  const int count = uhc::cuda_device_count();
  if (count >= 0) return py::make_tuple(count, py::str(""));
  return py::make_tuple(0, py::str(uhc::cuda_error_string(-count)));
}

}  // namespace

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "uhc_fast CUDA backend: per-sample solvers over raw device pointers, one thread per sample";
  m.def("solve", &solve, "Enqueue B packed solves on a stream (see uhc_fast/native.py).", UHC_SOLVE_ARGS,
        py::arg("device"), py::arg("stream"), py::arg("workspace"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("plan", &plan, "(threads, workspace bytes) for a call.", py::arg("method"), py::arg("dtype"), py::arg("batch"),
        py::arg("N"), py::arg("K"));
  m.def("device_count", &device_count, "(devices visible to this module's CUDA runtime, error message or '').");
  m.attr("runtime_version") = uhc::cuda_runtime_version();
}
