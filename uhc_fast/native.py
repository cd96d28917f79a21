"""The compiled backends: ``backend="cpu"`` (OpenMP) and ``backend="cuda"``.

Both run the per-sample solvers of ``csrc/core/`` (one C++ source for both) through pybind11
modules that take raw data pointers, so they never link libtorch. This module does everything
torch-side: the tensor checks, the dtype handling, the mask structure the kernels index with, and
the pointer passing. The calls are exposed to ``torch.compile`` as the custom op
``torch.ops.uhc_fast.solve`` (see :mod:`uhc_fast.ops`).

Extension modules: ``uhc_fast._native_cpu`` (always built by ``pip install``) and
``uhc_fast._native_cuda`` (built where nvcc is found; ``UHC_FAST_CUDA=0/1`` forces it off/on).
"""

from __future__ import annotations

import importlib
import weakref
from dataclasses import dataclass, fields
from functools import partial

import torch

from . import ops  # registers torch.ops.uhc_fast.solve (ops uses this module only at call time)
from .api import ITERATIVE
from .dispatch import Backend
from .inputs import PackedProblem
from .problem import Layout
from .reference import mf_lf_system
from .reference.common import DEFAULT_MAX_ITER, Solution, default_tol

# Codes shared with csrc/bindings.h (DType) and csrc/core/common.h (Method).
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
METHOD_CODES = {"sd": 0, "ce": 1, "mf-p": 2, "mf-lf": 3, "mf-lu": 4}
NEEDS_SYSTEM = ("mf-lf", "mf-lu")
MODULES = {"cpu": "uhc_fast._native_cpu", "cuda": "uhc_fast._native_cuda"}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute (and return soft labels) in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------- compiled modules
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


# ---------------------------------------------------------------------- mask structure
@dataclass(frozen=True)
class Structure:
    """What the kernels index with, all int32 on the layout's device.

    ``offsets`` (N+1) and ``class_index`` (nnz) walk the packed columns teacher by teacher;
    ``cls_ptr`` (K+1), ``cls_col`` (nnz) and ``cls_teacher`` (nnz) walk them class by class
    (entries of class ``l`` at ``cls_ptr[l]:cls_ptr[l+1]``, teachers ascending). Classes covered by
    the same teachers form a group (``ce`` iterates over groups, not classes): group ``g``'s classes
    are at ``grp_cls[grp_cls_ptr[g]:grp_cls_ptr[g+1]]`` and its teachers at
    ``grp_teacher[grp_ptr[g]:grp_ptr[g+1]]`` (ascending).
    """

    offsets: torch.Tensor
    class_index: torch.Tensor
    cls_ptr: torch.Tensor
    cls_col: torch.Tensor
    cls_teacher: torch.Tensor
    grp_cls_ptr: torch.Tensor
    grp_cls: torch.Tensor
    grp_ptr: torch.Tensor
    grp_teacher: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (
            self.offsets,
            self.class_index,
            self.cls_ptr,
            self.cls_col,
            self.cls_teacher,
            self.grp_cls_ptr,
            self.grp_cls,
            self.grp_ptr,
            self.grp_teacher,
        )


_structures: dict[int, tuple[torch.Tensor, weakref.ref, Structure]] = {}


def structure(layout: Layout) -> Structure:
    """The kernels' view of ``layout`` (cached per Layout outside ``torch.compile``)."""
    if torch.compiler.is_compiling():
        return _build_structure(layout, group=False)  # torch.unique's shape is data-dependent
    # keyed by a tensor the entry keeps alive, so the key cannot be reused by another layout
    key = id(layout.class_index)
    hit = _structures.get(key)
    if hit is not None and hit[0] is layout.class_index and hit[1]() is layout:
        return hit[2]
    built_structure = _build_structure(layout)
    forget = lambda _, key=key: _structures.pop(key, None)
    _structures[key] = (layout.class_index, weakref.ref(layout, forget), built_structure)
    return built_structure


def _build_structure(layout: Layout, group: bool = True) -> Structure:
    ci = layout.class_index
    if layout.nnz >= 2**31 or layout.num_classes >= 2**31:
        raise ValueError(f"nnz={layout.nnz} / K={layout.num_classes}: one sample's layout must fit int32 indices")
    order = torch.sort(ci, stable=True).indices  # packed columns are teacher-major: teachers stay ascending
    counts = torch.zeros(layout.num_classes, dtype=torch.int64, device=ci.device).index_add_(0, ci, torch.ones_like(ci))
    cls_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    cls_teacher = layout.teacher_index[order]
    if group:
        sets, class_group = torch.unique(layout.mask.T > 0, dim=0, return_inverse=True)  # (G, N) teacher sets
        grp_ptr = torch.cat([counts.new_zeros(1), sets.sum(dim=1).cumsum(0)])
        grp_teacher = torch.nonzero(sets)[:, 1]  # row-major: ascending within a group
        grp_cls = torch.sort(class_group, stable=True).indices
        grp_sizes = torch.bincount(class_group, minlength=sets.shape[0])
        grp_cls_ptr = torch.cat([counts.new_zeros(1), grp_sizes.cumsum(0)])
    else:  # every class its own group: the same arithmetic, without the data-dependent unique
        grp_cls = torch.arange(layout.num_classes, device=ci.device)
        grp_cls_ptr = torch.arange(layout.num_classes + 1, device=ci.device)
        grp_ptr, grp_teacher = cls_ptr, cls_teacher
    as32 = lambda t: t.to(torch.int32).contiguous()
    return Structure(
        as32(layout.offsets),
        as32(ci),
        as32(cls_ptr),
        as32(order),
        as32(cls_teacher),
        as32(grp_cls_ptr),
        as32(grp_cls),
        as32(grp_ptr),
        as32(grp_teacher),
    )


# ---------------------------------------------------------------------- checked launch
def _check(values, struct_tensors, weights, gplus, method) -> tuple[int, int, int]:
    """Validate the op's arguments; returns ``(N, K, nnz)``. Errors name the argument."""
    if method not in METHOD_CODES:
        raise ValueError(f"method={method!r}: expected one of {tuple(METHOD_CODES)}")
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values must be a 2-D (B, nnz) tensor, got {getattr(values, 'shape', type(values))}")
    if values.dtype not in DTYPE_CODES:
        raise TypeError(f"values: dtype {values.dtype} is not one of float16/bfloat16/float32/float64")
    if min(values.stride()) < 0:
        raise ValueError("values: negative strides are not supported")
    if len(struct_tensors) != len(fields(Structure)):
        raise ValueError(f"expected the {len(fields(Structure))} structure tensors, got {len(struct_tensors)}")
    for field, t in zip(fields(Structure), struct_tensors, strict=True):
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{field.name} must be a contiguous 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
        if t.device != values.device:
            raise ValueError(f"{field.name} is on {t.device}, values on {values.device}")
    st = Structure(*struct_tensors)
    n, nnz, k = st.offsets.numel() - 1, st.class_index.numel(), st.cls_ptr.numel() - 1
    if n < 1 or k < 1 or nnz < 1:
        raise ValueError(f"empty layout: N={n}, K={k}, nnz={nnz}")
    if values.shape[1] != nnz:
        raise ValueError(f"values has {values.shape[1]} columns, the layout has nnz={nnz}")
    if st.cls_col.numel() != nnz or st.cls_teacher.numel() != nnz:
        raise ValueError("cls_col and cls_teacher must have nnz entries")
    groups = st.grp_ptr.numel() - 1
    if not 1 <= groups <= k or st.grp_cls_ptr.numel() != groups + 1 or st.grp_cls.numel() != k:
        raise ValueError("grp_ptr and grp_cls_ptr must have G + 1 entries (1 <= G <= K) and grp_cls K entries")
    acc = accumulation_dtype(values.dtype)
    if weights.shape != (n,) or weights.dtype != acc or not weights.is_contiguous() or weights.device != values.device:
        raise ValueError(
            f"weights must be a contiguous ({n},) {acc} tensor on {values.device}, got "
            f"{weights.dtype} {tuple(weights.shape)} on {weights.device}"
        )
    if method in NEEDS_SYSTEM and (
        gplus.shape != (n, n) or gplus.dtype != acc or not gplus.is_contiguous() or gplus.device != values.device
    ):
        raise ValueError(f"gplus must be a contiguous ({n}, {n}) {acc} tensor on {values.device} for {method}")
    return n, k, nnz


def _outputs(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(values.dtype)
    b = values.shape[0]
    return (
        torch.empty(b, k, dtype=acc, device=values.device),
        torch.zeros(b, dtype=torch.int32, device=values.device),
        torch.zeros(b, dtype=acc, device=values.device),
    )


def _pointer_args(values, struct_tensors, weights, gplus, method, tol, max_iter, ce_max_iter, outs, n, k, nnz):
    soft, iterations, residual = outs
    structure_pointers = {field.name: t.data_ptr() for field, t in zip(fields(Structure), struct_tensors, strict=True)}
    return dict(
        method=METHOD_CODES[method],
        dtype=DTYPE_CODES[values.dtype],
        batch=values.shape[0],
        N=n,
        K=k,
        nnz=nnz,
        values=values.data_ptr(),
        row_stride=values.stride(0),
        col_stride=values.stride(1),
        **structure_pointers,
        G=Structure(*struct_tensors).grp_ptr.numel() - 1,
        weights=weights.data_ptr(),
        gplus=gplus.data_ptr() if method in NEEDS_SYSTEM else 0,
        tol=float(tol),
        max_iter=int(max_iter),
        ce_max_iter=int(ce_max_iter),
        soft=soft.data_ptr(),
        iterations=iterations.data_ptr(),
        residual=residual.data_ptr(),
    )


def _prepare(launcher, device_type, widen, values, struct_tensors, weights, gplus, method, tol, max_iter, ce_max_iter):
    """What every launcher does first: check the arguments and the device, widen 16-bit values where
    the CUDA kernels read them (``widen``), allocate the outputs. Returns ``(values, outputs, pointer
    arguments)``, the last None for an empty batch; the caller holds on to ``values`` (a widened copy
    must outlive the launch that reads it)."""
    n, k, nnz = _check(values, struct_tensors, weights, gplus, method)
    if values.device.type != device_type:
        raise ValueError(f"{launcher} needs {device_type.upper()} tensors, values are on {values.device}")
    if widen and values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()  # the CUDA build instantiates float32/float64 only (compile time)
    outs = _outputs(values, k)
    if values.shape[0] == 0:
        return values, outs, None
    return (
        values,
        outs,
        _pointer_args(values, struct_tensors, weights, gplus, method, tol, max_iter, ce_max_iter, outs, n, k, nnz),
    )


def launch_cpu(values, struct_tensors, weights, gplus, method, tol, max_iter, ce_max_iter):
    """Run the CPU kernels; returns ``(soft (B, K), iterations (B,) int32, residual (B,))``."""
    module = load_module("cpu")
    values, outs, args = _prepare(
        "backend 'cpu'", "cpu", False, values, struct_tensors, weights, gplus, method, tol, max_iter, ce_max_iter
    )
    if args is not None:
        module.solve(**args, threads=torch.get_num_threads())
    return outs


def launch_cuda(values, struct_tensors, weights, gplus, method, tol, max_iter, ce_max_iter):
    """Enqueue the CUDA kernels on the current torch stream; returns the same as :func:`launch_cpu`."""
    module = load_module("cuda")
    values, outs, args = _prepare(
        "backend 'cuda'", "cuda", True, values, struct_tensors, weights, gplus, method, tol, max_iter, ce_max_iter
    )
    if args is not None:
        threads, nbytes = module.plan(args["method"], args["dtype"], args["batch"], args["N"], args["K"])
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=values.device)
        stream = torch.cuda.current_stream(values.device)
        module.solve(
            **args,
            device=values.device.index if values.device.index is not None else torch.cuda.current_device(),
            stream=stream.cuda_stream,
            workspace=workspace.data_ptr(),
            threads=threads,
        )
        workspace.record_stream(stream)
    return outs


def launch_cuda_grid_on_cpu(
    values, struct_tensors, weights, gplus, method, tol, max_iter, ce_max_iter, grid_threads=None
):
    """The CUDA launcher run on the CPU: the same dtype handling, thread grid (``grid_threads``
    emulated GPU threads, by default the launcher's own plan), interleaved scratch and grid-stride
    loop as :func:`launch_cuda`, on CPU tensors. Tests use it to exercise the GPU's per-thread code
    path where no GPU is lent; returns the same as :func:`launch_cpu`."""
    module = load_module("cpu")
    values, outs, args = _prepare(
        "the CUDA-grid emulation",
        "cpu",
        True,
        values,
        struct_tensors,
        weights,
        gplus,
        method,
        tol,
        max_iter,
        ce_max_iter,
    )
    if args is not None:
        if grid_threads is None:
            grid_threads, _ = module.grid_plan(args["method"], args["dtype"], args["batch"], args["N"], args["K"])
        module.solve_grid(**args, grid_threads=grid_threads, threads=torch.get_num_threads())
    return outs


# ---------------------------------------------------------------------- solvers
def solve_arguments(
    values: torch.Tensor,
    layout: Layout,
    weights: torch.Tensor,
    method: str,
    tol: float | None = None,
    max_iter: int | None = None,
    gplus: torch.Tensor | None = None,
) -> tuple:
    """``(values, structure tensors, weights, gplus, method, tol, max_iter, ce_max_iter)``: the launch
    functions' arguments for :func:`solve_values`' (defaults filled in, dtypes and devices matched)."""
    acc = accumulation_dtype(values.dtype)
    tol = default_tol(acc) if tol is None else float(tol)
    max_iter = DEFAULT_MAX_ITER if max_iter is None else int(max_iter)
    weights = weights.to(device=values.device, dtype=acc).contiguous()
    if gplus is None:
        gplus = weights.new_zeros(0, 0)
    gplus = gplus.to(device=values.device, dtype=acc).contiguous()
    return (
        values,
        structure(layout).tensors(),
        weights,
        gplus,
        method,
        tol,
        max_iter,
        DEFAULT_MAX_ITER,  # the ce solve mf-p starts from
    )


def solve_values(
    values: torch.Tensor,
    layout: Layout,
    weights: torch.Tensor,
    method: str,
    tol: float | None = None,
    max_iter: int | None = None,
    gplus: torch.Tensor | None = None,
) -> Solution:
    """Solve packed ``values`` (B, nnz) of any float dtype and strides with the compiled kernels.

    ``values`` are probabilities renormalised per teacher (sd/ce/mf-p) or logits (mf-lf/mf-lu), as
    in :class:`~uhc_fast.inputs.PackedProblem`; ``weights`` is ``(N,)``; ``gplus`` the ``(N, N)``
    mf-lf system (:func:`~uhc_fast.reference.mf_lf_system`, required for mf-lf/mf-lu). The device of
    ``values`` picks the CPU or CUDA kernels. Returns soft labels ``(B, K)`` in float64 for float64
    values, else float32; ``iterations``/``residual`` ``(B,)`` for the iterative methods, else None.
    """
    values, struct_tensors, *rest = solve_arguments(values, layout, weights, method, tol, max_iter, gplus)
    return as_solution(method, ops.solve(values, *struct_tensors, *rest))


def as_solution(method: str, outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Solution:
    """A launch's ``(soft, iterations, residual)`` as a Solution (no iterations for one-shot methods)."""
    soft, iterations, residual = outs
    return Solution(soft, iterations, residual) if method in ITERATIVE else Solution(soft)


def _solve_problem(method: str, problem: PackedProblem, tol: float | None = None, max_iter: int | None = None):
    gplus = mf_lf_system(problem) if method in NEEDS_SYSTEM else None
    return solve_values(problem.values, problem.layout, problem.weights, method, tol, max_iter, gplus)


def _solvers() -> dict:
    return {method: partial(_solve_problem, method) for method in METHOD_CODES}


def cpu_backend() -> Backend:
    """The OpenMP backend (ImportError when ``uhc_fast._native_cpu`` was not built)."""
    module = load_module("cpu")

    details = {
        "kind": "compiled C++ (pybind11), OpenMP over samples" if module.openmp else "compiled C++, single thread",
        "built": True,
        "module": module.__file__,
        "openmp": bool(module.openmp),
        "threads": torch.get_num_threads(),
    }
    return Backend("cpu", ("cpu",), _solvers(), None, details)


def cuda_backend() -> Backend:
    """The CUDA backend: ImportError when not built, RuntimeError when built but unusable here."""
    module = load_module("cuda")
    version = f"{module.runtime_version // 1000}.{module.runtime_version % 1000 // 10}"
    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA device"
        raise RuntimeError(f"{MODULES['cuda']} is built (CUDA runtime {version}) but not usable: {why}")
    count, message = module.device_count()
    if count == 0:
        raise RuntimeError(
            f"{MODULES['cuda']} is built (CUDA runtime {version}) but its runtime sees no device: "
            f"{message or 'no devices'} (the driver may be older than CUDA {version})"
        )
    details = {
        "kind": "compiled CUDA (pybind11), one thread per sample",
        "built": True,
        "module": module.__file__,
        "cuda_runtime": version,
    }
    return Backend("cuda", ("cuda",), _solvers(), None, details)
