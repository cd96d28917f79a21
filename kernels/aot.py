"""Compile every kernel ahead of time for a CUDA target, without a GPU, with ptxas's statistics.

The interpreter accepts Python that the Triton compiler rejects (and runs device functions as
plain Python), so CI also lowers each kernel through Triton's full pipeline to PTX, then runs
ptxas (Triton's bundled one, else the CUDA toolkit's) with ``-v`` for its register, spill, stack
and shared-memory report. A kernel variant is fixed by its constexprs (dtypes and tile sizes), which
depend on the number of teachers and the dtypes only, never on K or the batch: :func:`variants`
lists the variants a problem shape runs. Must run in a process without ``TRITON_INTERPRET``.

    python -m uhc_fast.kernels.aot            # every kernel at N = 20, float16 -> float32
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from . import ce, launch, loss, mf_lf, mf_lu, mf_p, sd
from ._common import block_teachers, interpreting, tl_dtype

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# kernel arguments by name: pointer element types (VDT / OUT follow the answers' dtype)
_POINTERS = {
    "teachers_ptr": "*i64",
    "tables": "*i32",
    "weights_ptr": "*fp64",
    "params_ptr": "*fp64",
    "ws_ptr": "*fp64",
    "system_ptr": "*fp64",
    "iterations_ptr": "*i32",
    "converged_ptr": "*i1",
    "errors_ptr": "*i64",
}
_OUT = ("vals_ptr", "out_ptr", "residual_ptr", "step_ptr", "abs_residual_ptr")
_INTS = ("batch", "vals_stride", "ws_stride", "max_iter", "ce_max_iter", "nnz")


@dataclass
class Record:
    """One compiled kernel variant and what ptxas reported for it."""

    kernel: str
    method: str
    shape: str
    input_dtype: str
    answer_dtype: str
    constexprs: dict
    num_warps: int
    maxnreg: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    barriers: int | None = None
    cubin_bytes: int | None = None
    compile_seconds: float | None = None
    error: str | None = None

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["constexprs"] = {k: str(v) for k, v in self.constexprs.items()}
        out["spill_bytes"] = self.spills
        return out


def variants(num_teachers: int, input_dtype: torch.dtype, methods=None) -> list[tuple]:
    """``(kernel, method, constexprs, launch options)`` of every kernel a problem with
    ``num_teachers`` teachers whose outputs are ``input_dtype`` runs (the loss: student logits in
    ``input_dtype``)."""
    answer = torch.float64 if input_dtype == torch.float64 else torch.float32
    vdt, idt = tl_dtype(answer), tl_dtype(input_dtype)
    methods = methods or (*launch.METHODS, "loss")
    kernels = {"sd": sd._sd_kernel, "ce": ce._ce_kernel, "mf-p": mf_p._mf_p_kernel, "mf-lf": mf_lf._mf_lf_kernel}
    kernels["mf-lu"] = mf_lu._mf_lu_kernel
    out = []
    for method in methods:
        if method == "loss":
            if num_teachers <= loss.MAX_TEACHERS:
                bn = block_teachers(num_teachers)
                dt = tl_dtype(answer)
                forward = {"DT": dt, "BLOCK_N": bn, "BLOCK_T": loss.teacher_block(bn)}
                out.append((loss._loss_forward_kernel, "loss", forward, {"num_warps": loss.NUM_WARPS}))
                backward = {"DT": dt, "BLOCK_R": launch.BLOCK_ROWS}
                out.append((loss._loss_backward_kernel, "loss", backward, {"num_warps": loss.NUM_WARPS}))
            continue
        if num_teachers > launch.MAX_TEACHERS[method]:
            continue
        consts = {"IN_DT": idt, "VDT": vdt, **launch.geometry(method, num_teachers)}
        out.append((kernels[method], method, consts, launch.options(method, num_teachers)))
    return out


def _signature(kernel, consts: dict, input_dtype: torch.dtype, answer: torch.dtype) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name] = _POINTERS[name]
        elif name in _OUT or name in ("loss_ptr", "lse_ptr", "grad_out_ptr"):
            sig[name] = "*" + _TYPES[answer]
        elif name in ("logits_ptr", "values_ptr", "grad_ptr"):
            sig[name] = "*" + _TYPES[input_dtype if name != "values_ptr" else answer]
        elif name in _INTS:
            sig[name] = "i32"
        else:
            raise KeyError(f"{kernel.__name__}: no AOT type for argument {name!r}")
    return sig


def ptxas_path(capability: int) -> str | None:
    """Triton's bundled ptxas for the target, else ``ptxas`` on the PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return shutil.which("ptxas")
    for args in ((capability,), ()):  # newer triton takes the architecture
        try:
            tool = get_ptxas(*args)
            return tool.path if hasattr(tool, "path") else tool[0]
        except TypeError:
            continue
    return shutil.which("ptxas")


_STATS = {
    "registers": r"Used (\d+) registers",
    "stack_bytes": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "barriers": r"used (\d+) barriers",
    "smem": r"(\d+) bytes smem",
}


def ptxas_stats(ptx: str, capability: int) -> dict:
    """Run ptxas ``-v`` on ``ptx`` for ``sm_<capability>`` (``a`` suffix where the PTX targets it)."""
    ptxas = ptxas_path(capability)
    if ptxas is None:
        raise RuntimeError("no ptxas found (neither triton's nor the CUDA toolkit's)")
    target = re.search(r"\.target\s+(sm_\w+)", ptx)
    arch = target.group(1) if target else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr[-2000:]}")
    out = {}
    for key, pattern in _STATS.items():
        found = re.search(pattern, done.stderr + done.stdout)
        out[key] = int(found.group(1)) if found else 0
    return out


def _describe(err: BaseException) -> str:
    """An error and its causes (a CompilationError's cause names the real problem), tail-trimmed."""
    parts = []
    while err is not None and len(parts) < 6:
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n--- caused by ---\n".join(parts)[-4000:]


def compile_variant(
    kernel, method: str, consts: dict, options: dict, input_dtype, capability: int, shape: str
) -> Record:
    """Compile one variant to PTX and a cubin for ``sm_<capability>`` and read ptxas's report."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    answer = torch.float64 if input_dtype == torch.float64 else torch.float32
    record = Record(
        kernel.__name__,
        method,
        shape,
        _TYPES[input_dtype],
        _TYPES[answer],
        consts,
        options["num_warps"],
        options.get("maxnreg"),
    )
    start = time.perf_counter()
    try:
        src = ASTSource(kernel, _signature(kernel, consts, input_dtype, answer), constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(options))
        stats = ptxas_stats(compiled.asm["ptx"], capability)
        record.registers = stats["registers"]
        record.spill_stores, record.spill_loads = stats["spill_stores"], stats["spill_loads"]
        record.stack_bytes, record.barriers = stats["stack_bytes"], stats["barriers"]
        record.shared_bytes = int(getattr(compiled.metadata, "shared", 0) or 0) + stats["smem"]
        record.cubin_bytes = len(compiled.asm.get("cubin", b""))
    except Exception as err:
        record.error = _describe(err)
    record.compile_seconds = round(time.perf_counter() - start, 2)
    return record


def compile_shape(num_teachers: int, input_dtype: torch.dtype, capability: int = 90, shape: str = "", methods=None):
    """Every kernel variant a problem with ``num_teachers`` teachers and ``input_dtype`` outputs runs."""
    if interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile")
    label = shape or f"N={num_teachers}"
    return [
        compile_variant(kernel, method, consts, options, input_dtype, capability, label)
        for kernel, method, consts, options in variants(num_teachers, input_dtype, methods)
    ]


def main(argv=None) -> int:
    """Compile every kernel at N = 20 (float16 inputs) and print one line per variant."""
    argv = sys.argv[1:] if argv is None else argv
    teachers = int(argv[0]) if argv else 20
    records = compile_shape(teachers, torch.float16)
    for r in records:
        print(
            f"{r.kernel:24s} {r.method:6s} regs={r.registers} spills={r.spills} stack={r.stack_bytes} "
            f"shared={r.shared_bytes} {r.compile_seconds}s {r.error or ''}"
        )
    return 1 if any(r.error for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Record", "compile_shape", "compile_variant", "ptxas_stats", "tl", "variants"]
