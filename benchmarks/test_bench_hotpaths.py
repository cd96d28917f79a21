"""pytest-benchmark suite for the hot paths: each backend's solve, packing, the direct loss, estimate,
the instruction-set variants of the CPU backend and the benchmarks' own baselines.

    pytest benchmarks                          # time them (pytest-benchmark's table)
    pytest benchmarks --benchmark-disable      # CI quick mode: run each once, check the answers

Every benchmark also checks its answer (against the torch reference, or the baselines against
``estimate``), so the quick mode is a smoke test of every available backend, not only a timing.
The problems are the benchmarks' primary workload, random class subsets. Not collected by the main
``pytest`` run (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import pytest
import torch

import uhc_fast
from uhc_fast import backends
from uhc_fast.backends.native_launch import launch_cpu
from uhc_fast.constants import default_tol
from uhc_fast.inputs import pack
from uhc_fast.methods import METHODS
from uhc_fast.reference import direct_ce_loss

from . import baselines, workloads
from .bench_native import launch_args
from .measure import synchronizer

pytest.importorskip("pytest_benchmark")

# (K, N, B): small enough for CI, large enough that the call is not all overhead
SIZES = {"small": (100, 10, 128), "wide": (1000, 10, 32)}
# the torch reference of mf-p / mf-lu takes seconds per call at K = 1000: CI runs them at "small" only
WIDE_METHODS = ("sd", "ce", "mf-lf")
DTYPE = torch.float32
TOL = default_tol(DTYPE)
# closed forms agree to rounding; iterative solvers stop at slightly different iterates (their
# precision is the unit tests' business), so a loose bound that still catches a wrong answer
AGREE = {"sd": 1e-5, "mf-lf": 1e-4, "ce": 1e-2, "mf-p": 1e-2, "mf-lu": 1e-2}


def _targets() -> list:
    """(backend, device) pairs usable here, torch first; Triton only on a GPU (never its interpreter)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for device in devices:
        for name in ("torch", "cpu", "cuda", "triton"):
            backend = backends.load(name)
            if isinstance(backend, str) or device not in backend.device_types:
                continue
            if name == "triton" and device == "cpu":
                continue
            out.append(pytest.param(name, device, id=f"{name}-{device}"))
    return out


@pytest.fixture(scope="module", params=list(SIZES))
def size(request):
    return request.param


_WORK: dict = {}


def _work(size: str, device: str) -> workloads.Workload:
    if (size, device) not in _WORK:
        k, n, b = SIZES[size]
        _WORK[size, device] = workloads.make(b, k, n, dtype=DTYPE, device=device)
    return _WORK[size, device]


_REFERENCE: dict = {}


def _reference(size: str, device: str, method: str):
    if (size, device, method) not in _REFERENCE:
        work = _work(size, device)
        _REFERENCE[size, device, method] = backends.load("torch").solve(
            work.convert(method, "torch", TOL), METHODS[method]
        )
    return _REFERENCE[size, device, method]


def _check_soft(soft: torch.Tensor, batch: int, classes: int) -> None:
    soft = soft.cpu().double()
    assert soft.shape == (batch, classes)
    assert bool((soft >= 0).all())
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("backend", "device"), _targets())
def test_solver(benchmark, backend, device, method, size):
    """``Backend.solve`` of a converted batch: what ``estimate`` runs after its argument checks."""
    chosen = backends.load(backend)
    if method not in chosen.methods:
        pytest.skip(f"{backend} does not implement {method}")
    if size != "small" and method not in WIDE_METHODS:
        pytest.skip(f"{method} runs at the small size only")
    work = _work(size, device)
    converted = work.convert(method, backend, TOL)
    spec = METHODS[method]
    sync = synchronizer(torch.device(device))

    def solve():
        out = chosen.solve(converted, spec)
        sync()
        return out

    benchmark.group = f"{method} {size}"
    solution = benchmark(solve)
    _check_soft(solution.soft, work.batch, work.num_classes)
    if solution.residual is not None:  # most samples reach the tolerance (the rest hit max_iter)
        assert float(solution.residual.double().median()) <= TOL
    if backend == "torch":
        _REFERENCE[size, device, method] = solution
        return
    reference = _reference(size, device, method)
    torch.testing.assert_close(solution.soft.cpu().double(), reference.soft.cpu().double(), rtol=0, atol=AGREE[method])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_pack(benchmark, device, size):
    """Validation and packing: the front half of the torch and Triton backends' solve."""
    work = _work(size, device)
    converted = work.convert("ce", "torch", TOL)
    benchmark.group = f"pack {size}"
    problem = benchmark(pack, converted, "probs")
    assert problem.values.shape == (work.batch, work.nnz)
    sums = torch.zeros(work.batch, work.num_teachers, device=device).index_add_(
        1, problem.layout.teacher_index, problem.values
    )
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), _targets())
def test_loss_forward_backward(benchmark, backend, device, size):
    """The direct `ce` training loss, forward and backward (the backend's fused loss, or the reference)."""
    loss_fn = backends.load(backend).loss
    if backend != "torch" and loss_fn is direct_ce_loss:
        pytest.skip(f"{backend}'s loss is the torch reference's")
    work = _work(size, device)
    problem = pack(work.convert("ce", backend, TOL), "probs")
    logits = torch.randn(work.batch, work.num_classes, generator=torch.Generator().manual_seed(0)).to(device)
    logits.requires_grad_(True)
    sync = synchronizer(torch.device(device))

    def step():
        logits.grad = None
        value = loss_fn(logits, problem)
        value.sum().backward()
        sync()
        return value.detach()

    benchmark.group = f"loss {size}"
    value = benchmark(step)
    grad = logits.grad.clone()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = direct_ce_loss(ref_logits, problem)
    ref.sum().backward()
    torch.testing.assert_close(value, ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["sd", "ce", "mf-lf"])
def test_estimate_end_to_end(benchmark, method, size):
    """``uhc_fast.estimate`` as users call it (auto backend): argument checks, conversion, solve."""
    work = _work(size, "cpu")
    benchmark.group = f"estimate {size}"
    soft = benchmark(uhc_fast.estimate, work.outputs, work.teachers, method)
    _check_soft(soft, work.batch, work.num_classes)
    reference = _reference(size, "cpu", method)
    torch.testing.assert_close(soft.double(), reference.soft.double(), rtol=0, atol=AGREE[method])


@pytest.mark.parametrize("method", ["sd", "ce"])
def test_cpu_instruction_sets_agree(benchmark, method):
    """Every instruction-set variant of the CPU backend gives the default variant's answers."""
    cpu = backends.load("cpu")
    if isinstance(cpu, str):
        pytest.skip(cpu)
    module = backends.native.load_module("cpu")
    isas = [isa for isa, entry in module.isas().items() if entry["supported"]]
    work = _work("small", "cpu")
    args = launch_args(work.convert(method, "cpu", TOL), METHODS[method])
    benchmark.group = f"isa {method}"
    answers = {isa: launch_cpu(*args, isa=isa) for isa in isas[:-1]}
    answers[isas[-1]] = benchmark(lambda: launch_cpu(*args, isa=isas[-1]))
    default = cpu.solve(work.convert(method, "cpu", TOL), METHODS[method])
    for isa, outs in answers.items():
        torch.testing.assert_close(outs[0].double(), default.soft.double(), rtol=0, atol=1e-5, msg=isa)


def test_mm_baseline_reaches_the_same_answer(benchmark):
    """The plain MM loop stops at the relative KKT residual tol and agrees with estimate's `ce`."""
    work = _work("small", "cpu")
    outputs = [o[:32] for o in work.outputs]
    benchmark.group = "baselines"
    soft, iterations = benchmark(baselines.mm_ce, outputs, work.teachers, TOL, 10_000, torch.float64)
    assert int(iterations.max()) < 10_000
    assert float(baselines.relative_kkt(soft, outputs, work.teachers).max()) <= TOL * (1 + 1e-6)
    ours = uhc_fast.estimate(outputs, work.teachers, "ce")
    assert float(baselines.relative_kkt(ours, outputs, work.teachers).max()) <= 2 * TOL
    # both are within about tol of the optimum in every class's relative mass
    torch.testing.assert_close(soft, ours.double(), rtol=0, atol=1e-3)


def test_copy_floor(benchmark):
    work = _work("small", "cpu")
    benchmark.group = "baselines"
    out = benchmark(baselines.copy_floor, work.outputs, work.num_classes)
    assert out.shape == (work.batch, work.num_classes)
    assert baselines.floor_bytes(work.outputs, work.num_classes) == work.batch * (work.nnz + work.num_classes) * 4
