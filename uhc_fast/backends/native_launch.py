"""The compiled modules of ``backend="cpu"`` and ``backend="cuda"``, and their checked launch.

Both run the solvers of ``csrc/core/`` (one C++ source for both) through pybind11 modules that
take raw data pointers, so they never link libtorch. The compiled core reads the teachers' arrays
as they are (any float dtype, any strides, numpy memory included), validates and converts them in
the same pass; this module does everything torch-side: the argument checks, the codes and the
pointer passing.

Extension modules: ``uhc_fast._native_cpu`` (always built by ``pip install``) and
``uhc_fast._native_cuda`` (built where nvcc is found; ``UHC_FAST_CUDA=0/1`` forces it off/on).
"""

from __future__ import annotations

import importlib

import torch

from ..constants import SUM_TOLERANCE
from ..methods import METHODS
from ..problem import STRUCTURE_HEADER

# codes shared with csrc/core/input.h (DType, Kind)
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
KIND_CODES = {"probs": 0, "logits": 1}
MODULES = {"cpu": "uhc_fast._native_cpu", "cuda": "uhc_fast._native_cuda"}
# What a launch returns, in order: soft labels (B, K); per sample the iterations (int32), whether it
# converged (bool), the method's residual, the Newton correction of its last point and (ce) the
# absolute KKT residual, in the answers' dtype; and (N, 4) int64, each teacher's first row failing
# each value check (-1: none; the checks of uhc_fast.inputs.CHECKS).
OUTPUTS = ("soft", "iterations", "converged", "residual", "step", "abs_residual", "errors")

_modules: dict[str, object] = {}
_errors: dict[str, str] = {}


def load_module(kind: str):
    """The compiled module for ``kind`` ("cpu" or "cuda"); ImportError saying why it cannot load."""
    if kind not in _modules and kind not in _errors:
        try:
            _modules[kind] = importlib.import_module(MODULES[kind])
        except ImportError as err:
            hint = "" if kind == "cpu" else " (built only where nvcc is found, or with UHC_FAST_CUDA=1)"
            _errors[kind] = f"{MODULES[kind]} is not built or cannot load{hint}: {err}"
    if kind in _errors:
        raise ImportError(_errors[kind])
    return _modules[kind]


def built(kind: str) -> bool:
    """Whether the compiled module for ``kind`` exists and imports (usable or not)."""
    try:
        load_module(kind)
    except ImportError:
        return False
    return True


def header(structure: torch.Tensor) -> dict[str, int]:
    """The sizes at the head of a structure buffer (N, K, nnz, G, E), read on the host."""
    return dict(zip(STRUCTURE_HEADER, structure[: len(STRUCTURE_HEADER)].tolist(), strict=True))


def teacher_table(tensors: list[torch.Tensor], kinds: list[int], num_teachers: int, device) -> torch.Tensor:
    """The ``(N, 4)`` int64 table of csrc/core/input.h's TeacherInput: data pointer, row and column
    strides, dtype and kind codes (packed as ``dtype | kind << 32``). Teachers beyond the given
    tensors (the alpha prior) have no data."""
    rows = []
    for i in range(num_teachers):
        kind = kinds[i]
        if i < len(tensors):
            x = tensors[i]
            rows.append([x.data_ptr(), x.stride(0), x.stride(1), DTYPE_CODES[x.dtype] | kind << 32])
        else:
            rows.append([0, 0, 0, DTYPE_CODES[torch.float64] | kind << 32])
    return torch.tensor(rows, dtype=torch.int64).to(device)


def check(tensors, kinds, structure, sizes, weights, system, method: str, out_dtype) -> None:
    """Validate a launch's arguments; errors name the argument."""
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"method={method!r}: expected one of {tuple(METHODS)}")
    n, k, nnz = sizes["N"], sizes["K"], sizes["nnz"]
    if n < 1 or k < 1 or nnz < 1:
        raise ValueError(f"empty layout: N={n}, K={k}, nnz={nnz}")
    if not 1 <= len(tensors) <= n or len(kinds) != n:
        raise ValueError(
            f"{len(tensors)} teacher tensors and {len(kinds)} kinds for N={n} (the prior teacher has no tensor)"
        )
    device = tensors[0].device
    batch = tensors[0].shape[0]
    for i, x in enumerate(tensors):
        if x.dim() != 2 or x.dtype not in DTYPE_CODES or x.device != device or x.shape[0] != batch:
            raise ValueError(
                f"teacher {i}: expected a 2-D float tensor of {batch} rows on {device}, got {x.dtype} {tuple(x.shape)} "
                f"on {x.device}"
            )
        if min(x.stride()) < 0:
            raise ValueError(f"teacher {i}: negative strides are not supported")
    if structure.dtype != torch.int32 or structure.dim() != 1 or not structure.is_contiguous():
        raise ValueError(
            f"structure must be a contiguous 1-D int32 tensor, got {structure.dtype} {tuple(structure.shape)}"
        )
    if structure.device != device:
        raise ValueError(f"structure is on {structure.device}, the teachers on {device}")
    if out_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"out_dtype must be float32 or float64, got {out_dtype}")
    f64 = torch.float64
    if weights.shape != (n,) or weights.dtype != f64 or not weights.is_contiguous() or weights.device != device:
        raise ValueError(
            f"weights must be a contiguous ({n},) float64 tensor on {device}, got "
            f"{weights.dtype} {tuple(weights.shape)} on {weights.device}"
        )
    if spec.needs_system and (
        system.shape != (n, n) or system.dtype != f64 or not system.is_contiguous() or system.device != device
    ):
        raise ValueError(f"system must be a contiguous ({n}, {n}) float64 tensor on {device} for {method}")


def empty_outputs(batch: int, classes: int, teachers: int, out_dtype, device) -> tuple[torch.Tensor, ...]:
    """Fresh output tensors for a launch (see :data:`OUTPUTS`)."""
    return (
        torch.empty(batch, classes, dtype=out_dtype, device=device),
        torch.zeros(batch, dtype=torch.int32, device=device),
        torch.zeros(batch, dtype=torch.bool, device=device),
        *(torch.zeros(batch, dtype=out_dtype, device=device) for _ in range(3)),
        torch.full((teachers, 4), -1, dtype=torch.int64, device=device),
    )


def _prepare(
    device_type, tensors, kinds, structure, weights, system, method, out_dtype, temperature, eps, tol, max_iter
):
    """Check the arguments and allocate the outputs. Returns ``(outputs, keep, pointer arguments or
    None for an empty batch)``; the caller holds on to ``keep`` (tensors the launch reads by pointer)."""
    sizes = header(structure)
    check(tensors, kinds, structure, sizes, weights, system, method, out_dtype)
    device = tensors[0].device
    if device.type != device_type:
        raise ValueError(f"backend {device_type!r} needs {device_type.upper()} tensors, the teachers are on {device}")
    batch, spec = tensors[0].shape[0], METHODS[method]
    outs = empty_outputs(batch, sizes["K"], sizes["N"], out_dtype, device)
    if batch == 0:
        return outs, (), None
    table = teacher_table(tensors, kinds, sizes["N"], device)
    # host memory on every device: make_problem (csrc/bindings.h) copies it into the launch's arguments
    tolerance = torch.tensor([SUM_TOLERANCE[dtype] for dtype in DTYPE_CODES], dtype=torch.float64)
    args = dict(
        method=spec.code,
        out_dtype=DTYPE_CODES[out_dtype],
        batch=batch,
        teachers=table.data_ptr(),
        structure=structure.data_ptr(),
        **sizes,
        weights=weights.data_ptr(),
        system=system.data_ptr() if spec.needs_system else 0,
        temperature=float(temperature),
        eps=float(eps),
        tol=float(tol),
        sum_tolerance=tolerance.data_ptr(),
        value_kind=KIND_CODES[spec.value_kind],
        max_iter=int(max_iter),
        **{name: t.data_ptr() for name, t in zip(OUTPUTS, outs, strict=True)},
    )
    return outs, (table, tolerance), args


def launch_cpu(tensors, kinds, structure, weights, system, method, out_dtype, temperature, eps, tol, max_iter, isa=""):
    """Run the CPU kernels (the instruction-set variant ``isa``, default the widest supported);
    returns the tensors of :data:`OUTPUTS`."""
    module = load_module("cpu")
    outs, keep, args = _prepare(
        "cpu", tensors, kinds, structure, weights, system, method, out_dtype, temperature, eps, tol, max_iter
    )
    if args is not None:
        module.solve(**args, threads=torch.get_num_threads(), isa=isa)
    del keep
    return outs


def launch_cuda(tensors, kinds, structure, weights, system, method, out_dtype, temperature, eps, tol, max_iter):
    """Enqueue the CUDA kernels on the current torch stream of the teachers' device."""
    module = load_module("cuda")
    outs, keep, args = _prepare(
        "cuda", tensors, kinds, structure, weights, system, method, out_dtype, temperature, eps, tol, max_iter
    )
    if args is not None:
        device = tensors[0].device
        with torch.cuda.device(device):
            threads, nbytes = module.plan(
                args["method"], args["batch"], *(args[k] for k in STRUCTURE_HEADER), device=device.index
            )
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
            stream = torch.cuda.current_stream(device)
            module.solve(
                **args,
                device=device.index,
                stream=stream.cuda_stream,
                workspace=workspace.data_ptr(),
                threads=threads,
            )
            for t in (workspace, *keep):
                if t.device == device:  # (the sum tolerances stay in host memory)
                    t.record_stream(stream)
    return outs


def launch_cuda_grid_on_cpu(
    tensors,
    kinds,
    structure,
    weights,
    system,
    method,
    out_dtype,
    temperature,
    eps,
    tol,
    max_iter,
    grid_threads=None,
    lanes=None,
):
    """The CUDA launcher run on the CPU, on CPU tensors; returns the same as :func:`launch_cpu`.
    Tests use it to exercise the GPU's code paths where no GPU is lent.

    ``sd``, ``mf-lf`` (a warp per sample) and ``ce`` (a block per sample) run by teams:
    ``grid_threads`` teams (by default one block of them) of ``lanes`` threads (by default the
    GPU's: 32, or 128 for ``ce``) playing the lanes. ``mf-p`` and ``mf-lu`` run
    :func:`launch_cuda`'s thread grid: ``grid_threads`` emulated GPU threads (by default the
    launcher's own plan), interleaved scratch and grid-stride loop."""
    module = load_module("cpu")
    outs, keep, args = _prepare(
        "cpu", tensors, kinds, structure, weights, system, method, out_dtype, temperature, eps, tol, max_iter
    )
    if args is not None:
        shape = module.team_shapes.get(args["method"])
        if shape is not None:
            team_lanes, per_block = shape
            teams = per_block if grid_threads is None else grid_threads  # (the GPU's: whole blocks)
            module.solve_teams(**args, teams=teams, lanes=team_lanes if lanes is None else lanes)
        else:
            if grid_threads is None:
                grid_threads, _ = module.grid_plan(args["method"], args["batch"], *(args[k] for k in STRUCTURE_HEADER))
            module.solve_grid(**args, grid_threads=grid_threads, threads=torch.get_num_threads())
    del keep
    return outs
