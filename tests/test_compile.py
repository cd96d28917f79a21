"""The compiled kernels as the ``torch.ops.uhc_fast.solve`` custom op: opcheck, its fake
implementation, ``torch.compile(fullgraph=True)`` over ``estimate(backend="cpu")``, and eager
calls that never pay for the compiler stack."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import uhc_fast
from uhc_fast import methods
from uhc_fast.backends import native_launch

from .problems import FLOAT_DTYPES, make, tolerance

try:
    native_launch.load_module("cpu")
except ImportError as err:  # pragma: no cover - installed without the extension
    pytest.skip(f"CPU extension not built: {err}", allow_module_level=True)
from uhc_fast.backends import native_op

ROOT = Path(__file__).resolve().parents[1]


def sample(seed: int = 0, batch: int = 5, **spec):
    return make(seed, batch=batch, classes=11, teachers=4, noise=0.2, link=3, coverage=0.5, **spec)


def op_args(problem, method: str, dtype=torch.float32, kinds=None) -> tuple:
    """``torch.ops.uhc_fast.solve``'s arguments for ``problem`` (as the cpu backend builds them)."""
    spec = methods.get(method)
    teachers = problem.teachers()
    layout = teachers.layout()
    weights = torch.ones(teachers.num_teachers, dtype=torch.float64)
    system = layout.mf_lf_system(weights, torch.float64) if spec.needs_system else weights.new_zeros(0, 0)
    kinds = [native_launch.KIND_CODES[problem.inputs]] * teachers.num_teachers if kinds is None else kinds
    out_dtype = native_launch.DTYPE_CODES[torch.float64 if dtype == torch.float64 else torch.float32]
    return (problem.tensors(dtype), kinds, layout.structure, weights, system, method, teachers.num_classes, out_dtype,
            1.0, 1e-12, 1e-6, 50)  # fmt: skip


OPCHECKS = [(method, torch.float32) for method in methods.NAMES]
OPCHECKS += [(method, dtype) for method in ("ce", "mf-lu") for dtype in FLOAT_DTYPES if dtype != torch.float32]


@pytest.mark.parametrize(("method", "dtype"), OPCHECKS, ids=str)
def test_opcheck(method, dtype):
    torch.library.opcheck(torch.ops.uhc_fast.solve.default, op_args(sample(), method, dtype))


def test_opcheck_strided_logits_and_an_empty_batch():
    problem = sample(1, inputs="logits")
    args = op_args(problem, "mf-lu")
    strided = [x.t().contiguous().t() for x in args[0]]
    torch.library.opcheck(torch.ops.uhc_fast.solve.default, (strided, *args[1:]))
    empty = op_args(sample(2, batch=0), "ce")
    torch.library.opcheck(torch.ops.uhc_fast.solve.default, empty)


def test_the_op_computes_what_estimate_does():
    problem = sample(3)
    outs = torch.ops.uhc_fast.solve(*op_args(problem, "ce", torch.float64))
    assert len(outs) == len(native_launch.OUTPUTS)
    soft, info = uhc_fast.estimate(problem.tensors(), problem.sets, "ce", backend="cpu", tol=1e-6, max_iter=50,
                                   return_info=True)  # fmt: skip
    assert torch.equal(outs[0], soft) and torch.equal(outs[1], info["iterations"])
    assert bool((outs[-1] == -1).all())


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = op_args(sample(4), "mf-lu", torch.float64)
    with FakeTensorMode() as mode:
        tensors = [mode.from_tensor(t) for t in args[0]]
        fake = [tensors, args[1], *(mode.from_tensor(t) for t in args[2:5]), *args[5:]]
        soft, iterations, converged, residual, step, abs_residual, errors = native_op.solve(*fake)
    assert soft.shape == (5, 11) and soft.dtype == torch.float64
    assert iterations.shape == (5,) and iterations.dtype == torch.int32
    assert converged.shape == (5,) and converged.dtype == torch.bool
    for t in (residual, step, abs_residual):
        assert t.shape == (5,) and t.dtype == torch.float64
    assert errors.shape == (4, 4) and errors.dtype == torch.int64


@pytest.mark.parametrize(("method", "compiler"), [("ce", "inductor"), ("mf-lf", "aot_eager"), ("mf-lu", "aot_eager")])
def test_compile_fullgraph_estimate(method, compiler):
    """estimate(..., backend="cpu") traces as one graph around the custom op (no graph breaks)."""
    problem = sample(5)
    teachers = problem.teachers()
    outputs = problem.tensors(torch.float32)
    eager = uhc_fast.estimate(outputs, teachers, method, backend="cpu")
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda outs: uhc_fast.estimate(outs, teachers, method, backend="cpu"), fullgraph=True, backend=compiler
    )
    got = compiled(outputs)
    torch.testing.assert_close(got, eager, atol=tolerance(method, torch.float32), rtol=0)
    again = compiled([x * 1 for x in problem.tensors(torch.float32)])  # the same graph, new inputs
    torch.testing.assert_close(again, eager, atol=tolerance(method, torch.float32), rtol=0)


def run_fresh(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_compile_before_any_eager_call(monkeypatch):
    """A training step compiled before any eager call in the process: the backend is first loaded
    inside the trace (here: its cache emptied, as in a fresh process)."""
    from uhc_fast import backends

    monkeypatch.setattr(backends, "_cache", {})
    problem = sample(6)
    teachers = problem.teachers()
    outputs = problem.tensors(torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda outs: uhc_fast.estimate(outs, teachers, "ce", backend="cpu"), fullgraph=True, backend="aot_eager"
    )
    got = compiled(outputs)
    eager = uhc_fast.estimate(outputs, teachers, "ce", backend="cpu")
    torch.testing.assert_close(got, eager, atol=tolerance("ce", torch.float32), rtol=0)


def test_the_first_eager_estimate_does_not_import_the_compiler():
    """Eager calls go to the launcher directly: a custom op's first call would import torch._dynamo
    (seconds), which eager users must not pay for."""
    out = run_fresh(
        """
        import sys, time, torch
        import uhc_fast
        outputs = [torch.softmax(torch.randn(3, 3), 1), torch.softmax(torch.randn(3, 2), 1)]
        start = time.perf_counter()
        for method in uhc_fast.METHODS:
            soft, info = uhc_fast.estimate(outputs, [[0, 1, 2], [2, 3]], method, backend="cpu", return_info=True)
            assert info["backend"] == "cpu"
        print(time.perf_counter() - start, "torch._dynamo" in sys.modules)
        """
    )
    seconds, dynamo = out.split()
    assert dynamo == "False"
    assert float(seconds) < 5.0  # in practice milliseconds; a compiler import would take seconds
