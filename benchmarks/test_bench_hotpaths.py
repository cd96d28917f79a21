"""pytest-benchmark suite for the hot paths: each backend's solvers, input packing, the direct loss.

    pytest benchmarks                          # time them (pytest-benchmark's table)
    pytest benchmarks --benchmark-disable      # CI quick mode: run each once, check the answers

Every benchmark also checks its answer against the torch reference, so the quick mode is a smoke
test of every available backend, not only a timing. Not collected by the main ``pytest`` run
(``testpaths = ["tests"]``).
"""

from __future__ import annotations

import pytest
import torch

import uhc_fast
from uhc_fast import dispatch
from uhc_fast.api import METHODS
from uhc_fast.inputs import pack
from uhc_fast.loss import direct_ce_loss
from uhc_fast.reference import SOLVERS
from uhc_fast.reference.common import default_tol

from . import workloads
from .measure import synchronizer

pytest.importorskip("pytest_benchmark")

# (K, N, B): small enough for CI, large enough that the call is not all overhead
SIZES = {"small": (100, 10, 128), "wide": (1000, 10, 32)}
# the torch reference of mf-p / mf-lu takes seconds per call at K = 1000: CI times them at "small" only
WIDE_METHODS = ("sd", "ce", "mf-lf")
DTYPE = torch.float32
# closed forms agree to rounding; iterative solvers stop at slightly different iterates (their
# precision is the unit tests' business), so a loose bound that still catches a wrong answer
AGREE = {"sd": 1e-5, "mf-lf": 1e-4, "ce": 1e-2, "mf-p": 1e-2, "mf-lu": 1e-2}


def _targets() -> list:
    """(backend, device) pairs usable here, torch first; Triton only on a GPU (never its interpreter)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for device in devices:
        for name in ("torch", "cpu", "cuda", "triton"):
            backend = dispatch.load(name)
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
        _REFERENCE[size, device, method] = SOLVERS[method](_work(size, device).packed(method), default_tol(DTYPE), None)
    return _REFERENCE[size, device, method]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("backend", "device"), _targets())
def test_solver(benchmark, backend, device, method, size):
    solvers = dispatch.load(backend).solvers
    if method not in solvers:
        pytest.skip(f"{backend} does not implement {method}")
    if size != "small" and method not in WIDE_METHODS:
        pytest.skip(f"{method} is timed at the small size only")
    work = _work(size, device)
    problem = work.packed(method)
    tol = default_tol(DTYPE)
    sync = synchronizer(torch.device(device))

    def solve():
        out = solvers[method](problem, tol, None)
        sync()
        return out

    benchmark.group = f"{method} {size}"
    solution = benchmark(solve)
    soft = solution.soft.cpu().double()
    assert soft.shape == (work.batch, work.num_classes)
    assert bool((soft >= 0).all())
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(work.batch, dtype=torch.float64), rtol=0, atol=1e-5)
    if solution.residual is not None:  # most samples reach the tolerance (the rest hit max_iter)
        assert float(solution.residual.double().median()) <= tol
    if backend == "torch":
        _REFERENCE[size, device, method] = solution
        return
    reference = _reference(size, device, method)
    torch.testing.assert_close(solution.soft.cpu().double(), reference.soft.cpu().double(), rtol=0, atol=AGREE[method])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_pack(benchmark, device, size):
    """Validation and packing: the shared front half of every ``estimate`` call."""
    work = _work(size, device)
    benchmark.group = f"pack {size}"
    problem, _ = benchmark(pack, work.outputs, work.teachers, inputs="probs", value_kind="probs")
    assert problem.values.shape == (work.batch, work.nnz)
    sums = torch.zeros(work.batch, work.num_teachers, device=device).index_add_(
        1, problem.layout.teacher_index, problem.values
    )
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), _targets())
def test_loss_forward_backward(benchmark, backend, device, size):
    """The direct `ce` training loss, forward and backward (the backend's fused loss, or the reference)."""
    loss_fn = dispatch.load(backend).loss
    if loss_fn is None:
        if backend != "torch":
            pytest.skip(f"{backend} has no fused loss")
        loss_fn = direct_ce_loss
    work = _work(size, device)
    problem = work.packed("ce")
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


def test_estimate_end_to_end(benchmark, size):
    """``uhc_fast.estimate`` as users call it (auto backend, `ce`): validation, packing, solve."""
    work = _work(size, "cpu")
    benchmark.group = f"estimate {size}"
    soft = benchmark(uhc_fast.estimate, work.outputs, work.teachers, "ce")
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(work.batch), rtol=0, atol=1e-5)
