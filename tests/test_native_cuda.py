"""The compiled CUDA backend against the torch reference (needs a GPU: every test is ``gpu``-marked).

Without a GPU these are skipped by conftest; the CUDA sources are still compiled by every build
where nvcc exists, and ``test_native_cpu`` runs the CUDA launcher's thread grid (interleaved
scratch, grid-stride loop, the same per-sample code) on the CPU.
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

from .problems import consistent_outputs, noisy, random_class_sets, random_soft_labels
from .problems import native_tolerance as tolerance

pytestmark = pytest.mark.gpu


def make_problem(method, batch, classes, teachers, seed, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    sets = random_class_sets(classes, teachers, 0.4, rng)
    q = random_soft_labels(batch, classes, seed)
    outputs = [p.to(dtype).cuda() for p in noisy(consistent_outputs(q, sets), 0.3, seed)]
    problem, _ = pack(outputs, TeacherSet(sets), value_kind=METHODS[method])
    return problem


def cuda_backend():
    return dispatch.select("cuda", torch.device("cuda"))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "classes", "teachers", "seed"), [(17, 23, 5, 0), (301, 31, 7, 1), (1, 13, 3, 2)])
def test_matches_reference(method, dtype, batch, classes, teachers, seed):
    problem = make_problem(method, batch, classes, teachers, seed, dtype)
    ref = reference.SOLVERS[method](problem, None, None)
    got = cuda_backend().solvers[method](problem, None, None)
    assert got.soft.device.type == "cuda" and got.soft.dtype == dtype
    torch.testing.assert_close(got.soft, ref.soft, atol=tolerance(method, dtype), rtol=0)
    if method in ITERATIVE:
        assert (got.iterations - ref.iterations).abs().max().item() <= 1


@pytest.mark.parametrize("method", list(METHODS))
def test_empty_batch(method):
    problem = make_problem(method, 0, 11, 3, 3)
    assert cuda_backend().solvers[method](problem, None, None).soft.shape == (0, 11)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_estimate_all_input_dtypes_matches_cpu(method, dtype):
    rng = np.random.default_rng(9)
    sets = random_class_sets(15, 4, 0.5, rng)
    q = random_soft_labels(33, 15, 9)
    outputs = [p.to(dtype) for p in noisy(consistent_outputs(q, sets), 0.2, 9)]
    soft_cpu = uhc_fast.estimate(outputs, sets, method, backend="cpu")
    soft_gpu, info = uhc_fast.estimate([p.cuda() for p in outputs], sets, method, backend="cuda", return_info=True)
    assert info["backend"] == "cuda"
    torch.testing.assert_close(soft_gpu.cpu(), soft_cpu, atol=tolerance(method, soft_cpu.dtype), rtol=0)


@pytest.mark.parametrize("method", ["ce", "mf-lf"])
def test_strided_values_on_a_side_stream(method):
    from uhc_fast import native

    problem = make_problem(method, 64, 19, 5, 4, torch.float32)
    wide = torch.zeros(64, 2 * problem.values.shape[1], device="cuda")
    wide[:, ::2] = problem.values
    gplus = reference.mf_lf_system(problem) if method in native.NEEDS_SYSTEM else None
    expected = reference.SOLVERS[method](problem, None, None).soft
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = native.solve_values(wide[:, ::2], problem.layout, problem.weights, method, gplus=gplus).soft
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected, atol=tolerance(method, torch.float32), rtol=0)


def test_auto_picks_cuda_and_info():
    report = uhc_fast.info()
    assert report["cuda"]["available"] is True and report["cuda"]["built"] is True
    assert report["auto"]["cuda"] == "cuda"
