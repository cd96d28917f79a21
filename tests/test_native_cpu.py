"""The compiled CPU backend against the torch reference, method by method.

Every method on randomised problems with odd K, N, B (B = 0 and 1 included), float16/bfloat16/
float32/float64 inputs, non-contiguous packed values, weights, uncovered classes and the alpha
prior; plus the argument checks, forced-backend errors and what ``info()`` reports.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import uhc_fast
from uhc_fast import dispatch, reference
from uhc_fast.api import ITERATIVE, METHODS
from uhc_fast.inputs import pack
from uhc_fast.problem import TeacherSet
from uhc_fast.reference.common import default_tol

from .problems import consistent_outputs, noisy, random_class_sets, random_soft_labels
from .problems import native_tolerance as tolerance

native = pytest.importorskip("uhc_fast.native")
try:
    native.load_module("cpu")
except ImportError as err:  # pragma: no cover - the package was installed without its extension
    pytest.skip(f"CPU extension not built: {err}", allow_module_level=True)


def make_problem(method, batch, classes, teachers, seed, dtype=torch.float64, coverage=0.4, noise=0.3, **kwargs):
    rng = np.random.default_rng(seed)
    sets = random_class_sets(classes, teachers, coverage, rng)
    q = random_soft_labels(batch, classes, seed)
    outputs = [p.to(dtype) for p in noisy(consistent_outputs(q, sets), noise, seed)]
    problem, _ = pack(outputs, TeacherSet(sets), value_kind=METHODS[method], **kwargs)
    return problem


def assert_matches(method, problem, tol=None, max_iter=None):
    ref = reference.SOLVERS[method](problem, tol, max_iter)
    got = native.cpu_backend().solvers[method](problem, tol, max_iter)
    dtype = problem.values.dtype
    assert got.soft.dtype == dtype and got.soft.shape == ref.soft.shape
    torch.testing.assert_close(got.soft, ref.soft, atol=tolerance(method, dtype), rtol=0)
    if method in ITERATIVE:
        tol = default_tol(dtype) if tol is None else tol
        assert got.iterations.dtype == torch.int32 and got.residual.dtype == dtype
        # same algorithm: the same step counts, up to a step where rounding straddles tol
        assert (got.iterations - ref.iterations).abs().max().item() <= 1 if len(problem.values) else True
        converged = ref.residual <= tol
        assert bool((got.residual[converged] <= tol).all())
    else:
        assert got.iterations is None and got.residual is None
    return got, ref


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "classes", "teachers", "seed"), [(17, 23, 5, 0), (9, 31, 7, 1), (1, 13, 3, 2)])
def test_matches_reference(method, dtype, batch, classes, teachers, seed):
    assert_matches(method, make_problem(method, batch, classes, teachers, seed, dtype))


@pytest.mark.parametrize("method", list(METHODS))
def test_empty_batch(method):
    problem = make_problem(method, 0, 11, 3, 3)
    got = native.cpu_backend().solvers[method](problem, None, None)
    assert got.soft.shape == (0, 11)
    if method in ITERATIVE:
        assert got.iterations.shape == (0,) and got.residual.shape == (0,)


@pytest.mark.parametrize("method", list(METHODS))
def test_weights_uncovered_classes_and_prior(method):
    rng = np.random.default_rng(5)
    sets = [[0, 1, 2], [2, 3, 4, 5], [6, 7], [7, 8, 9, 0]]  # class 10 uncovered
    teachers = TeacherSet(sets, num_classes=11)
    q = random_soft_labels(7, 11, 4)
    outputs = noisy(consistent_outputs(q, sets), 0.2, 6)
    problem, _ = pack(outputs, teachers, value_kind=METHODS[method], weights=rng.uniform(0.5, 2.0, 4), alpha=0.05)
    got, _ = assert_matches(method, problem)
    assert bool((got.soft[:, 10] == 0).all())


@pytest.mark.parametrize("method", ITERATIVE)
def test_iteration_cap_and_tolerance(method):
    problem = make_problem(method, 11, 19, 5, 7, noise=0.8)
    assert_matches(method, problem, tol=1e-6, max_iter=2)
    got, _ = assert_matches(method, problem, tol=1e-3)
    assert bool((got.residual <= 1e-3).all())
    capped = native.cpu_backend().solvers[method](problem, 1e-12, 0)
    assert int(capped.iterations.max()) <= (1 if method == "mf-lu" else 0)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_direct_dtypes_and_strides(method, dtype):
    """The kernels read any float dtype and any strides; they compute in float32 (float64 for float64)."""
    problem = make_problem(method, 13, 17, 5, 8)
    values = problem.values.to(dtype)
    # the same values through a transposed (column-major) and a column-strided view
    transposed = values.t().contiguous().t()
    wide = torch.zeros(values.shape[0], 2 * values.shape[1], dtype=dtype)
    wide[:, ::2] = values
    strided = wide[:, ::2]
    assert not transposed.is_contiguous() and not strided.is_contiguous()
    acc = native.accumulation_dtype(dtype)
    rounded = pack_like(problem, values.to(acc))
    gplus = reference.mf_lf_system(rounded) if method in native.NEEDS_SYSTEM else None
    ref = reference.SOLVERS[method](rounded, None, None)
    for view in (values, transposed, strided):
        got = native.solve_values(view, problem.layout, problem.weights, method, gplus=gplus)
        assert got.soft.dtype == acc
        torch.testing.assert_close(got.soft, ref.soft, atol=tolerance(method, acc), rtol=0)


def pack_like(problem, values):
    return type(problem)(values, problem.layout, problem.weights.to(values.dtype), problem.teachers)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_estimate_all_input_dtypes(method, dtype):
    rng = np.random.default_rng(9)
    sets = random_class_sets(15, 4, 0.5, rng)
    q = random_soft_labels(9, 15, 9)
    outputs = [p.to(dtype) for p in noisy(consistent_outputs(q, sets), 0.2, 9)]
    # half-precision rows sum to 1 only to their rounding: renormalise in float64 first
    soft_cpu, info = uhc_fast.estimate(outputs, sets, method, backend="cpu", return_info=True)
    soft_ref = uhc_fast.estimate(outputs, sets, method, backend="torch")
    assert info["backend"] == "cpu"
    assert soft_cpu.dtype == soft_ref.dtype
    torch.testing.assert_close(soft_cpu, soft_ref, atol=tolerance(method, soft_ref.dtype), rtol=0)


def test_numpy_and_auto_selection():
    rng = np.random.default_rng(10)
    sets = random_class_sets(9, 3, 0.5, rng)
    q = random_soft_labels(5, 9, 10)
    outputs = [p.numpy() for p in consistent_outputs(q, sets)]
    soft, info = uhc_fast.estimate(outputs, sets, "ce", return_info=True)
    assert isinstance(soft, np.ndarray) and info["backend"] == "cpu"  # auto picks the compiled backend on CPU
    np.testing.assert_allclose(soft, q.numpy(), atol=1e-7)  # consistent teachers: exact recovery


def test_groups_do_not_change_the_answer():
    """ce iterates over classes grouped by their covering teachers; one class per group is the same math."""
    problem = make_problem("ce", 8, 21, 6, 11)
    grouped = native.structure(problem.layout)
    single = native._build_structure(problem.layout, group=False)
    assert grouped.grp_ptr.numel() <= single.grp_ptr.numel()
    weights = problem.weights.contiguous()
    empty = weights.new_zeros(0, 0)
    a = native.launch_cpu(problem.values, grouped.tensors(), weights, empty, "ce", 1e-10, 100, 100)
    b = native.launch_cpu(problem.values, single.tensors(), weights, empty, "ce", 1e-10, 100, 100)
    torch.testing.assert_close(a[0], b[0], atol=1e-12, rtol=0)


# ---------------------------------------------------------------- the CUDA launcher's grid, run on the CPU
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_grid_on_cpu_matches_the_cpu_backend_exactly(method, dtype):
    """The GPU's per-thread path (16-bit values widened first, scratch interleaved across threads,
    grid-stride loop) does the CPU backend's arithmetic, so the answers are identical for any grid,
    including grids with fewer threads than samples and with idle threads."""
    problem = make_problem(method, 13, 17, 5, 8)
    values = problem.values.to(dtype)
    acc = native.accumulation_dtype(dtype)
    gplus = reference.mf_lf_system(pack_like(problem, values.to(acc))) if method in native.NEEDS_SYSTEM else None
    for view in (values, values.t().contiguous().t()):
        args = native.solve_arguments(view, problem.layout, problem.weights, method, gplus=gplus)
        expected = native.launch_cpu(*args)
        for grid_threads in (None, 1, 4, 13, 40):
            got = native.launch_cuda_grid_on_cpu(*args, grid_threads=grid_threads)
            for name, a, b in zip(("soft", "iterations", "residual"), got, expected, strict=True):
                assert torch.equal(a, b), f"{name} differs with {grid_threads} grid threads"


def test_cuda_grid_plan_caps_the_workspace():
    module = native.load_module("cpu")
    method, dtype = native.METHOD_CODES["mf-lu"], native.DTYPE_CODES[torch.float32]
    per_thread = module.scratch_elements(method, 20, 1000) * 4
    assert module.grid_plan(method, dtype, 100, 20, 1000) == (100, 100 * per_thread)  # one thread per sample
    threads, nbytes = module.grid_plan(method, dtype, 10**9, 20, 1000)
    assert nbytes == threads * per_thread <= 256 << 20 < (threads + 1) * per_thread
    assert module.grid_plan(native.METHOD_CODES["sd"], dtype, 10**9, 2, 3)[0] == 1 << 20  # thread cap


# ---------------------------------------------------------------- the shared dense kernels
def dense_solve(kind, matrix, rhs, dtype, ld, fill=float("nan")):
    """Run the C++ kernel on ``matrix`` stored with rows ``ld`` apart (the rest of each row ``fill``)."""
    n = matrix.shape[0]
    stored = torch.full((n, ld), fill, dtype=dtype)
    stored[:, :n] = matrix
    x = rhs.to(dtype).clone()
    ok = native.load_module("cpu").dense_solve(kind, native.DTYPE_CODES[dtype], stored.data_ptr(), x.data_ptr(), n, ld)
    return ok, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 13, 20, 33])
def test_dense_kernels_solve_like_torch(n, dtype):
    """The Newton systems' Cholesky (rows padded to a multiple of 4 and updated four at a time, the
    padding being scratch: NaN there must not leak) and LU kernels, shared by the CPU and CUDA
    solvers, against torch.linalg.solve in float64."""
    gen = torch.Generator().manual_seed(n)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    spd = m @ m.T + n * torch.eye(n, dtype=torch.float64)
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(spd, rhs)
    padded = native.load_module("cpu").padded(n)
    assert padded % 4 == 0 and n <= padded < n + 4
    rtol = 1e-4 if dtype == torch.float32 else 1e-11
    for kind, ld in (("cholesky", padded), ("lu", padded), ("lu", n)):
        ok, x = dense_solve(kind, spd, rhs, dtype, ld)
        assert ok, kind
        torch.testing.assert_close(x.double(), expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_dense_kernels_report_failure():
    indefinite = torch.diag(torch.tensor([1.0, -1.0, 2.0, 3.0, 0.5], dtype=torch.float64))
    rhs = torch.ones(5, dtype=torch.float64)
    ok, _ = dense_solve("cholesky", indefinite, rhs, torch.float64, 8)
    assert not ok  # the caller falls back to LU
    ok, x = dense_solve("lu", indefinite, rhs, torch.float64, 8)
    assert ok and torch.equal(x, 1 / torch.diagonal(indefinite))
    ok, _ = dense_solve("lu", torch.zeros(3, 3, dtype=torch.float64), rhs[:3], torch.float64, 3)
    assert not ok  # exactly singular: the caller takes a gradient step
    with pytest.raises(ValueError, match="padded"):
        dense_solve("cholesky", indefinite, rhs, torch.float64, 5)


def test_argument_errors_name_the_argument():
    problem = make_problem("ce", 4, 9, 3, 12)
    parts = native.structure(problem.layout).tensors()
    w = problem.weights
    empty = w.new_zeros(0, 0)
    with pytest.raises(ValueError, match="values has"):
        native.launch_cpu(problem.values[:, 1:], parts, w, empty, "ce", 1e-9, 10, 10)
    with pytest.raises(ValueError, match="weights"):
        native.launch_cpu(problem.values, parts, w.float(), empty, "ce", 1e-9, 10, 10)
    with pytest.raises(ValueError, match="gplus"):
        native.launch_cpu(problem.values, parts, w, empty, "mf-lf", 1e-9, 10, 10)
    with pytest.raises(ValueError, match="offsets"):
        native.launch_cpu(problem.values, (parts[0].long(), *parts[1:]), w, empty, "ce", 1e-9, 10, 10)
    with pytest.raises(ValueError, match="method"):
        native.launch_cpu(problem.values, parts, w, empty, "nope", 1e-9, 10, 10)
    with pytest.raises(TypeError, match="dtype"):
        native.launch_cpu(problem.values.to(torch.int32), parts, w, empty, "ce", 1e-9, 10, 10)


def test_forced_backends():
    cpu = dispatch.select("cpu", torch.device("cpu"), "ce")
    assert cpu.name == "cpu" and set(cpu.solvers) == set(METHODS)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        dispatch.select("cuda", torch.device("cpu"), "ce")
    with pytest.raises(RuntimeError, match="runs on"):
        dispatch.select("cpu", torch.device("cuda"), "ce")


def test_info_reports_built_and_usable():
    report = uhc_fast.info()
    assert report["cpu"]["available"] is True and report["cpu"]["built"] is True
    assert report["auto"]["cpu"] == "cpu"
    cuda = report["cuda"]
    assert cuda["built"] == native.built("cuda")
    if not torch.cuda.is_available():
        assert cuda["available"] is False
        assert ("not usable" in cuda["reason"]) if cuda["built"] else ("not built" in cuda["reason"])
