"""The fused Triton kernels against the torch reference.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported and these run
on CPU tensors through the interpreter (about 400x slower than torch, hence the tiny shapes);
with a GPU they run compiled on CUDA tensors. Every kernel is compared with the reference solver
on the same packed problem, over ragged tiles, K and N that are not powers of two, class tiles
that do not divide K, one-class teachers, zero probabilities, uncovered classes and each input
dtype. Run on their own: ``pytest -m interpret tests/test_triton.py``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import uhc_fast  # noqa: E402
from uhc_fast import reference  # noqa: E402
from uhc_fast.api import ITERATIVE, METHODS  # noqa: E402
from uhc_fast.inputs import pack, segment_sum  # noqa: E402
from uhc_fast.loss import direct_ce_loss as reference_loss  # noqa: E402
from uhc_fast.problem import TeacherSet  # noqa: E402
from uhc_fast.reference.mf import mf_lf_system  # noqa: E402
from uhc_fast.triton_backend import backend as triton_backend  # noqa: E402
from uhc_fast.triton_backend import load_kernels  # noqa: E402

from .problems import consistent_outputs, noisy, random_class_sets, random_soft_labels  # noqa: E402

pytestmark = pytest.mark.interpret

kernels = load_kernels()
from uhc_fast.kernels import _common, ops  # noqa: E402

DEVICE = "cpu" if kernels.interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("neither a GPU nor TRITON_INTERPRET=1", allow_module_level=True)

BACKEND = triton_backend()
# dtype-relative tolerances: both solvers stop at residual <= tol, so soft labels agree to ~tol
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}
ATOL = {torch.float32: 2e-4, torch.float64: 1e-8}
EXACT_ATOL = {torch.float32: 2e-6, torch.float64: 1e-13}  # closed forms: rounding only


@pytest.fixture
def small_tiles(monkeypatch):
    """Class tiles of 16 so that a K of a few dozen spans several ragged tiles."""
    monkeypatch.setattr(_common, "TILE_BUDGET", 16 * 16)


def problem_for(method, sets, outputs, num_classes=None, weights=None, alpha=None, inputs="probs"):
    teachers = TeacherSet(sets, num_classes=num_classes)
    problem, _ = pack(outputs, teachers, inputs=inputs, value_kind=METHODS[method], weights=weights, alpha=alpha)
    return problem


def noisy_problem(method, batch, num_classes, num_teachers, seed, dtype=torch.float32, coverage=0.35):
    sets = random_class_sets(num_classes, num_teachers, coverage, np.random.default_rng(seed))
    q = random_soft_labels(batch, num_classes, seed)
    outputs = [p.to(dtype=dtype, device=DEVICE) for p in noisy(consistent_outputs(q, sets), 0.4, seed)]
    weights = torch.linspace(0.5, 1.5, num_teachers).tolist()
    return problem_for(method, sets, outputs, weights=weights)


def run_both(method, problem, rows_per_program=None):
    """(kernel solution, reference solution) on the same packed problem."""
    tol = TOL[problem.values.dtype]
    expected = reference.SOLVERS[method](problem, tol, 100)
    if rows_per_program is None:
        got = BACKEND.solvers[method](problem, tol, 100)
    else:
        got = launch(method, problem, tol, rows_per_program)
    return got, expected


def launch(method, problem, tol, rows_per_program, values=None):
    """Call a kernel's launcher directly (explicit tile of rows, optional other value dtype)."""
    values = problem.values if values is None else values
    cmap = kernels.colmap(problem.layout)
    w = problem.weights
    if method == "sd":
        return reference.Solution(kernels.sd(values, w, cmap, rows_per_program=rows_per_program))
    if method == "mf-lf":
        return reference.Solution(kernels.mf_lf(values, w, cmap, mf_lf_system(problem), rows_per_program))
    if method == "ce":
        return reference.Solution(*kernels.ce(values, w, cmap, tol, 100, rows_per_program))
    if method == "mf-p":
        return reference.Solution(*kernels.mf_p(values, w, cmap, tol, 100, rows_per_program))
    return reference.Solution(*kernels.mf_lu(values, w, cmap, mf_lf_system(problem), tol, 100, rows_per_program))


def check(method, got, expected, dtype, exact_iterations=False):
    atol = ATOL[dtype] if method in ITERATIVE else EXACT_ATOL[dtype]
    assert got.soft.dtype == expected.soft.dtype
    assert bool(torch.isfinite(got.soft).all())
    torch.testing.assert_close(
        got.soft.sum(dim=1), torch.ones_like(got.soft[:, 0]), atol=10 * EXACT_ATOL[dtype], rtol=0
    )
    torch.testing.assert_close(got.soft, expected.soft, atol=atol, rtol=0)
    if method in ITERATIVE:
        assert bool((got.residual <= TOL[dtype]).all()), got.residual
        if exact_iterations:
            assert torch.equal(got.iterations, expected.iterations)
        elif method != "mf-lu":  # rounding may move a sample across tol by a step
            assert int((got.iterations - expected.iterations).abs().max()) <= 2
        # (float32 mf-lu ends in the rounding floor of its objective, where the two summation
        # orders differ by a few Gauss-Newton steps; float64 above pins its steps exactly)


# ---------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", list(METHODS))
def test_matches_reference_float64_step_for_step(method, small_tiles):
    """In float64 the kernels take the reference's very steps: same iterations, same residuals."""
    problem = noisy_problem(method, batch=5, num_classes=27, num_teachers=6, seed=1, dtype=torch.float64)
    got, expected = run_both(method, problem, rows_per_program=2)  # tiles of 2, 2, 1 rows
    check(method, got, expected, torch.float64, exact_iterations=True)
    if method in ITERATIVE:
        torch.testing.assert_close(got.residual, expected.residual, atol=1e-14, rtol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_matches_reference_float32(method):
    problem = noisy_problem(method, batch=4, num_classes=13, num_teachers=5, seed=2)
    check(method, *run_both(method, problem), torch.float32)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values_accumulate_in_float32(method, dtype):
    """Half-precision packed values are read as they are and accumulated in float32, and
    probabilities are renormalised per teacher on chip (rounding leaves rows off one by ~1e-3,
    which would leave `ce` without an optimum): the result is the reference's on the upcast,
    renormalised values."""
    problem = noisy_problem(method, batch=3, num_classes=11, num_teachers=4, seed=3)
    half = problem.values.to(dtype)
    upcast = half.float()
    if METHODS[method] == "probs":
        upcast = upcast / segment_sum(upcast, problem.layout)[:, problem.layout.teacher_index]
        assert float((segment_sum(half.float(), problem.layout) - 1).abs().max()) > 1e-5  # really off one
    upcast = dataclasses.replace(problem, values=upcast)
    tol = TOL[torch.float32]
    got = launch(method, upcast, tol, rows_per_program=2, values=half)
    check(method, got, reference.SOLVERS[method](upcast, tol, 100), torch.float32)


@pytest.mark.parametrize("method", list(METHODS))
def test_ragged_tiles_do_not_change_any_row(method):
    problem = noisy_problem(method, batch=7, num_classes=10, num_teachers=5, seed=4, coverage=0.5)
    tol = TOL[torch.float32]
    whole = launch(method, problem, tol, rows_per_program=None)
    ragged = launch(method, problem, tol, rows_per_program=3)  # 3 + 3 + 1
    assert torch.equal(whole.soft, ragged.soft)
    check(method, ragged, reference.SOLVERS[method](problem, tol, 100), torch.float32)


@pytest.mark.parametrize("method", list(METHODS))
def test_one_class_teachers_zero_probabilities_and_uncovered_classes(method, small_tiles):
    """Float64, so that both solvers converge far below the differences being tested: zero
    probabilities make these problems badly conditioned (a residual of 1e-5 leaves q loose by
    1e-3 for `mf-p`, and `mf-lu` sees log(eps) = -27.6 logits)."""
    # K = 19 (class 18 declared, covered by nobody), N = 5 with two one-class teachers
    sets = [[0, 1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 9, 10, 11], [11, 12, 13, 14, 15, 16, 17, 0], [3], [12]]
    q = random_soft_labels(4, 18, seed=5)
    outputs = noisy(consistent_outputs(q, sets), 0.3, seed=5)
    outputs[0][:, [1, 4]] = 0  # zero probabilities
    outputs[0] /= outputs[0].sum(dim=1, keepdim=True)
    outputs[2][0, 3] = 0
    outputs[2][0] /= outputs[2][0].sum()
    problem = problem_for(method, sets, [p.to(DEVICE) for p in outputs], num_classes=19)
    got, expected = run_both(method, problem)
    assert torch.equal(got.iterations, expected.iterations) if method in ITERATIVE else got.iterations is None
    atol = 1e-6 if method == "mf-lu" else 1e-10
    torch.testing.assert_close(got.soft, expected.soft, atol=atol, rtol=0)
    assert bool((got.soft[:, 18] == 0).all())
    if METHODS[method] == "probs":
        assert bool((got.soft[:, [1, 4]] == 0).all())  # no teacher gives them any mass


@pytest.mark.parametrize("method", ["ce", "mf-p", "mf-lf"])
def test_exact_recovery_from_consistent_teachers(method):
    sets = random_class_sets(12, 5, 0.4, np.random.default_rng(6))
    q = random_soft_labels(3, 12, seed=6)
    kind = "logits" if method == "mf-lf" else "probs"
    outputs = [p.to(DEVICE) for p in consistent_outputs(q, sets, kind)]
    soft = uhc_fast.estimate(outputs, sets, method, inputs=kind, backend="triton", tol=1e-12)
    assert soft.dtype == torch.float64
    torch.testing.assert_close(soft.cpu(), q, atol=1e-9, rtol=0)


def test_disconnected_classes_with_the_alpha_prior():
    sets = [[0, 1, 2], [2, 3], [4, 5, 6], [6, 7]]
    q = random_soft_labels(3, 8, seed=7)
    outputs = [p.float().to(DEVICE) for p in noisy(consistent_outputs(q, sets), 0.2, seed=7)]
    for method in ("sd", "ce"):
        got = uhc_fast.estimate(outputs, sets, method, alpha=0.05, backend="triton", return_info=True)
        expected = uhc_fast.estimate(outputs, sets, method, alpha=0.05, backend="torch", return_info=True)
        torch.testing.assert_close(got[0], expected[0], atol=ATOL[torch.float32], rtol=0)
        assert got[1]["backend"] == "triton"


def test_max_iter_caps_the_steps_and_reports_the_residual():
    problem = noisy_problem("ce", batch=3, num_classes=9, num_teachers=4, seed=8)
    got = BACKEND.solvers["ce"](problem, 1e-30, 2)
    expected = reference.SOLVERS["ce"](problem, 1e-30, 2)
    assert bool((got.iterations == 2).all())
    torch.testing.assert_close(got.residual, expected.residual, atol=1e-6, rtol=1e-2)
    torch.testing.assert_close(got.soft, expected.soft, atol=1e-5, rtol=0)


def test_empty_batch():
    problem = noisy_problem("ce", batch=2, num_classes=6, num_teachers=3, seed=9)
    empty = dataclasses.replace(problem, values=problem.values[:0])
    for method in METHODS:
        assert BACKEND.solvers[method](empty, 1e-5, 10).soft.shape == (0, 6)


def test_too_many_teachers_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(kernels, "MAX_NEWTON_TEACHERS", 2)
    problem = noisy_problem("ce", batch=2, num_classes=6, num_teachers=3, seed=10)
    got = BACKEND.solvers["ce"](problem, 1e-5, 100)
    assert torch.equal(got.soft, reference.SOLVERS["ce"](problem, 1e-5, 100).soft)


# ---------------------------------------------------------------------------- the loss
def loss_problem(batch=5, num_classes=21, num_teachers=5, seed=11, dtype=torch.float32):
    problem = noisy_problem("ce", batch, num_classes, num_teachers, seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, num_classes, generator=gen, dtype=dtype)).to(DEVICE)
    return problem, logits


@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_loss_and_gradient_match_reference(logit_dtype, small_tiles):
    problem, logits = loss_problem()
    logits = logits.to(logit_dtype).requires_grad_()
    upcast = logits.detach().float().requires_grad_()
    got = BACKEND.loss(logits, problem)
    expected = reference_loss(upcast, problem)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    weights = torch.linspace(0.5, 2.0, logits.shape[0], device=DEVICE)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    assert logits.grad.dtype == logit_dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[logit_dtype]
    torch.testing.assert_close(logits.grad.float(), upcast.grad, atol=tol, rtol=tol)


def test_loss_gradcheck_float64():
    problem, logits = loss_problem(batch=3, num_classes=8, num_teachers=3, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda u: BACKEND.loss(u, problem), (logits,))


def test_uhc_loss_module_uses_the_fused_loss():
    problem, logits = loss_problem(batch=4, num_classes=10, num_teachers=4, seed=12)
    sets = [list(cs) for cs in problem.teachers.class_sets]
    outputs = [problem.values[:, a:b] for a, b in zip(problem.layout.offsets[:-1], problem.layout.offsets[1:])]
    fused = uhc_fast.UHCLoss(sets, weights=problem.weights.tolist(), temperature=2.0, backend="triton")
    plain = uhc_fast.UHCLoss(sets, weights=problem.weights.tolist(), temperature=2.0, backend="torch")
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    fused(a, outputs).backward()
    plain(b, outputs).backward()
    torch.testing.assert_close(fused(a, outputs), plain(b, outputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- custom ops
def op_samples():
    problem = noisy_problem("ce", batch=3, num_classes=7, num_teachers=3, seed=13)
    lf = noisy_problem("mf-lf", batch=3, num_classes=7, num_teachers=3, seed=13)
    cmap = kernels.colmap(problem.layout)
    w = problem.weights
    logits = torch.randn(3, 7, device=DEVICE, requires_grad=True)
    system = mf_lf_system(lf)
    return [
        (ops.triton_sd, (problem.values, w, cmap)),
        (ops.triton_ce, (problem.values, w, cmap, 1e-5, 100)),
        (ops.triton_mf_p, (problem.values, w, cmap, 1e-5, 100)),
        (ops.triton_mf_lf, (lf.values, w, cmap, system)),
        (ops.triton_mf_lu, (lf.values, w, cmap, system, 1e-5, 100)),
        (ops.triton_loss, (logits, problem.values, w, cmap)),
    ]


@pytest.mark.parametrize("index", range(6), ids=["sd", "ce", "mf-p", "mf-lf", "mf-lu", "loss"])
def test_opcheck(index):
    op, args = op_samples()[index]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_training_step_with_the_fused_loss():
    problem, _ = loss_problem(batch=4, num_classes=9, num_teachers=3, seed=14)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 9).to(DEVICE)
    x = torch.randn(4, 6, device=DEVICE)

    def step(x):
        return BACKEND.loss(model(x), problem).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = reference_loss(model(x), problem).mean()
    eager.backward()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def compiled_uhc_loss_step_matches_eager():
    sets = random_class_sets(9, 3, 0.5, np.random.default_rng(15))
    q = random_soft_labels(4, 9, seed=15)
    outputs = [p.float().to(DEVICE) for p in noisy(consistent_outputs(q, sets), 0.3, seed=15)]
    loss_fn = uhc_fast.UHCLoss(sets, backend="triton")
    uhc_fast.info()  # load the backends outside the compiled region
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 9).to(DEVICE)
    x = torch.randn(4, 6, device=DEVICE)

    compiled = torch.compile(lambda x, outputs: loss_fn(model(x), outputs), fullgraph=True)
    loss = compiled(x, outputs)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = uhc_fast.UHCLoss(sets, backend="torch")(model(x), outputs)
    eager.backward()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_over_uhc_loss():
    """The issue's requirement: a training step through ``UHCLoss(backend="triton")`` compiles
    into one graph (default inductor backend) with the fused op inside, forward and backward."""
    compiled_uhc_loss_step_matches_eager()


# ---------------------------------------------------------------------------- backend and compiler
def test_backend_reports_itself():
    report = uhc_fast.info()["triton"]
    assert report["available"], report
    assert report["devices"] == [DEVICE]
    assert report["methods"] == sorted(METHODS)


def test_backend_refuses_cpu_tensors_without_the_interpreter():
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import torch\n"
        "from uhc_fast import dispatch\n"
        "b = dispatch.load('triton')\n"
        "print('unavailable' if isinstance(b, str) else b.device_types)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    expected = "('cuda',)" if torch.cuda.is_available() else "unavailable"
    assert out.stdout.strip() == expected


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    """The interpreter runs Python the compiler would reject: lower every kernel to a cubin."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "from uhc_fast.triton_backend import load_kernels\n"
        "load_kernels()\n"
        "from uhc_fast.kernels.compile_check import compile_all\n"
        "print('\\n'.join(compile_all(90, dtypes=('fp32',))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("bytes of cubin") == 7, out.stdout
