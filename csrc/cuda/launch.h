// Host-side interface of the CUDA launcher (kernels.cu), callable from code that does not include
// the CUDA headers (module.cpp).
#pragma once

#include <cstdint>

#include "grid.h"

namespace uhc {

// (threads, workspace bytes) of a call on `device`: for the team methods, teams (warps).
Plan cuda_plan(int method, int64_t batch, const Structure& s, int device);

// Enqueue the solve on `stream` (a cudaStream_t as an integer) of device `device`.
void cuda_launch(const Args& args, int device, uintptr_t stream, uintptr_t workspace, int64_t threads);

// Devices the CUDA runtime linked into this module sees, or a negative CUDA error code.
int cuda_device_count();
// The runtime's message for a CUDA error code.
const char* cuda_error_string(int code);
// The CUDA runtime version this module was built with (e.g. 13000).
int cuda_runtime_version();

}  // namespace uhc
