"""Compile every kernel for a CUDA target without a GPU (``python -m uhc_fast.kernels.compile_check``).

The interpreter accepts Python that the Triton compiler rejects (and runs device functions as
plain Python), so CI also lowers each kernel through Triton's full pipeline to PTX and a cubin for
``sm_90`` (Triton ships its own ptxas): a kernel that would not compile on a GPU fails here.
Must run in a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import interpreting
from .ce import _ce_kernel
from .loss import _loss_backward_kernel, _loss_forward_kernel
from .mf import _mf_lf_kernel, _mf_lu_kernel, _mf_p_kernel
from .sd import _sd_kernel

_SIZES = ("batch", "nnz", "num_teachers", "num_classes", "rows_per_program", "max_iter", "ce_max_iter")


def _signature(kernel, pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        elif name == "tol":
            sig[name] = "fp32"
        elif name in _SIZES:
            sig[name] = "i64" if name in ("batch", "rows_per_program") else "i32"
        else:
            raise KeyError(f"{kernel.__name__}: no type for argument {name!r}")
    return sig


def _cases(values: str, dt, eps: float, tiny: float, bn: int = 32, bk: int = 128):
    acc = "*fp64" if dt == tl.float64 else "*fp32"
    common = {"values_ptr": values, "colmap_ptr": "*i32", "iterations_ptr": "*i32", "weights_ptr": acc}
    for name in ("out_ptr", "residual_ptr", "gp_ptr", "loss_ptr", "lse_ptr", "grad_out_ptr"):
        common[name] = acc
    blocks = {"DT": dt, "BLOCK_N": bn, "BLOCK_K": bk}
    solver = {**blocks, "EPS": eps, "TINY": tiny}
    yield _sd_kernel, common, blocks
    yield _ce_kernel, common, solver
    yield _mf_lf_kernel, common, blocks
    yield _mf_p_kernel, common, solver
    yield _mf_lu_kernel, common, solver
    student = {**common, "logits_ptr": "*bf16", "grad_ptr": "*bf16"}
    yield _loss_forward_kernel, student, blocks
    yield _loss_backward_kernel, student, blocks


def compile_all(capability: int = 90, dtypes: tuple[str, ...] = ("fp32", "fp64")) -> list[str]:
    """Compile every kernel for ``sm_<capability>`` with the given accumulation dtypes (float16
    values into float32, float64 into float64); returns one line per kernel compiled."""
    if interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile")
    target = GPUTarget("cuda", capability, 32)
    done = []
    variants = {
        "fp32": ("*fp16", tl.float32, 1.1920928955078125e-07, 1.1754943508222875e-38),
        "fp64": ("*fp64", tl.float64, 2.220446049250313e-16, 2.2250738585072014e-308),
    }
    for values, dt, eps, tiny in (variants[name] for name in dtypes):
        for kernel, pointers, constexprs in _cases(values, dt, eps, tiny):
            src = ASTSource(kernel, _signature(kernel, pointers, constexprs), constexprs=constexprs)
            compiled = triton.compile(src, target=target)
            done.append(f"{kernel.__name__} ({values[1:]} -> {dt}): {len(compiled.asm['cubin'])} bytes of cubin")
    return done


if __name__ == "__main__":
    for line in compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90):
        print(line)
