"""The compiled kernels as ``torch.library`` custom ops: opcheck, and ``torch.compile`` over estimate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import uhc_fast
from uhc_fast.api import METHODS
from uhc_fast.inputs import pack
from uhc_fast.problem import TeacherSet

from .problems import consistent_outputs, noisy, random_class_sets, random_soft_labels

native = pytest.importorskip("uhc_fast.native")
try:
    native.load_module("cpu")
except ImportError as err:  # pragma: no cover
    pytest.skip(f"CPU extension not built: {err}", allow_module_level=True)
from uhc_fast import ops  # noqa: E402


def sample_problem(method: str, dtype=torch.float32, batch: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    sets = random_class_sets(11, 4, 0.5, rng)
    q = random_soft_labels(batch, 11, seed)
    outputs = [p.to(dtype) for p in noisy(consistent_outputs(q, sets), 0.2, seed)]
    teachers = TeacherSet(sets)
    problem, _ = pack(outputs, teachers, value_kind=METHODS[method])
    return teachers, outputs, problem


def op_args(problem, method, dtype=None, group=True):
    values = problem.values if dtype is None else problem.values.to(dtype)
    acc = native.accumulation_dtype(values.dtype)
    weights = problem.weights.to(acc).contiguous()
    if method in native.NEEDS_SYSTEM:
        gplus = uhc_fast.reference.mf_lf_system(problem).to(acc).contiguous()
    else:
        gplus = weights.new_zeros(0, 0)
    parts = native._build_structure(problem.layout, group=group).tensors()
    return (values, *parts, weights, gplus, method, 1e-6, 50, 100)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(method, dtype):
    _, _, problem = sample_problem(method)
    torch.library.opcheck(ops.solve, op_args(problem, method, dtype))


def test_opcheck_empty_batch():
    _, _, problem = sample_problem("ce", batch=0)
    torch.library.opcheck(ops.solve, op_args(problem, "ce"))


def test_fake_shapes():
    _, _, problem = sample_problem("mf-lu", torch.float64)
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = op_args(problem, "mf-lu")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        soft, iterations, residual = ops.solve(*fake)
    assert soft.shape == (5, 11) and soft.dtype == torch.float64
    assert iterations.shape == (5,) and iterations.dtype == torch.int32
    assert residual.shape == (5,) and residual.dtype == torch.float64


@pytest.mark.parametrize(("method", "compiler"), [("ce", "inductor"), ("mf-lf", "aot_eager"), ("mf-lu", "aot_eager")])
def test_compile_fullgraph_estimate(method, compiler):
    """estimate(..., backend="cpu") traces as one graph around the custom op (no graph breaks)."""
    teachers, outputs, _ = sample_problem(method)
    eager = uhc_fast.estimate(outputs, teachers, method, backend="cpu")
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda outs: uhc_fast.estimate(outs, teachers, method, backend="cpu"), fullgraph=True, backend=compiler
    )
    got = compiled(outputs)
    torch.testing.assert_close(got, eager, atol=2e-4 if method != "mf-lf" else 1e-6, rtol=0)
