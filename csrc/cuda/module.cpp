// uhc_fast._native_cuda: pybind11 bindings of the CUDA launcher. Compiled by the host compiler;
// the kernels live in kernels.cu and the CUDA runtime is linked statically.
#include <pybind11/pybind11.h>

#include "cuda/launch.h"

namespace py = pybind11;

namespace {

void solve(UHC_SOLVE_PARAMS, int device, uintptr_t stream, uintptr_t workspace, int64_t threads) {
  const uhc::Args args = UHC_SOLVE_PARAMS_AS_ARGS;
  uhc::check(args);
  uhc::cuda_launch(args, device, stream, workspace, threads);
}

py::tuple plan(int method, int64_t batch, int64_t N, int64_t K, int64_t nnz, int64_t G, int64_t E, int64_t P,
               int device) {
  const uhc::Plan p = uhc::cuda_plan(method, batch, uhc::Structure::of_sizes(N, K, nnz, G, E, P), device);
  return py::make_tuple(p.threads, p.workspace_bytes);
}

py::tuple device_count() {
  const int count = uhc::cuda_device_count();
  if (count >= 0) return py::make_tuple(count, py::str(""));
  return py::make_tuple(0, py::str(uhc::cuda_error_string(-count)));
}

}  // namespace

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "uhc_fast CUDA backend: the core's solvers over raw device pointers (sd, mf-lf: a warp per sample; ce: a block; mf-p, mf-lu: a thread)";
  m.def("solve", &solve, "Enqueue B solves on a stream (see uhc_fast/backends/native_launch.py).", UHC_SOLVE_ARGS,
        py::arg("device"), py::arg("stream"), py::arg("workspace"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("plan", &plan, "(threads, workspace bytes) for a call on a device (team methods: teams, a warp or a block each).",
        py::arg("method"), py::arg("batch"), py::arg("N"), py::arg("K"), py::arg("nnz"), py::arg("G"), py::arg("E"),
        py::arg("P"), py::arg("device"));
  m.def("device_count", &device_count, "(devices visible to this module's CUDA runtime, error message or '').");
  m.attr("runtime_version") = uhc::cuda_runtime_version();
}
