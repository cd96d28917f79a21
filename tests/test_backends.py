"""Every backend against the torch reference and against the contract of ``uhc_fast.estimate``.

One module for all backends: each test takes a ``target`` (a backend and the device of its
tensors): ``torch`` and ``cpu`` on CPU tensors, ``triton`` on CPU tensors through its interpreter
(``interpret`` marker, tiny shapes), and ``torch``/``cuda``/``triton`` on CUDA tensors (``gpu``
marker, skipped without a GPU). A target that cannot run here is skipped with the reason
``uhc_fast`` gives. Problems come from ``tests/problems.py`` and every tolerance from its table.

Whether the reference itself is right is ``test_oracles.py``'s and ``test_reference.py``'s job;
here every backend must agree with it and honour the same contract: dtypes in and out, numpy in
and out, any batch size, any strides, weights, uncovered classes and the prior, the iteration cap
and the tolerance, the ``info`` fields, backend selection, and the same validation errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import uhc_fast
from uhc_fast import backends
from uhc_fast.constants import DEFAULT_DISCONNECTED_ALPHA, DEFAULT_MAX_ITER, compute_dtype, default_tol
from uhc_fast.errors import InputError
from uhc_fast.methods import ITERATIVE, NAMES

from .problems import FLOAT_DTYPES, consistent_outputs, make, max_diff, random_soft_labels, tolerance

pytestmark = pytest.mark.filterwarnings("ignore::uhc_fast.UnidentifiableScalesWarning")


# ---------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    backend: str
    device: str

    @property
    def interpreted(self) -> bool:
        """Triton on CPU tensors: its interpreter, about 400x slower than torch."""
        return self.backend == "triton" and self.device == "cpu"

    def shape(self, batch: int, classes: int, teachers: int) -> dict:
        """``make``'s size arguments, shrunk for the interpreter."""
        if self.interpreted:
            batch, classes, teachers = min(batch, 3), min(classes, 7), min(teachers, 3)
        return {"batch": batch, "classes": classes, "teachers": teachers}

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods a test runs on this target: the interpreter takes the cheap ones."""
        return INTERPRETED_METHODS if self.interpreted else NAMES

    def limit(self, method: str | None = None, dtype: torch.dtype | None = None, full: bool = False) -> None:
        """Skip what the interpreter would take minutes over: methods beyond :data:`INTERPRETED_METHODS`,
        dtypes beyond float32, or (``full=False``) the whole test."""
        if not self.interpreted:
            return
        if not full or (method is not None and method not in INTERPRETED_METHODS):
            pytest.skip("the Triton interpreter runs this on the cheap methods only")
        if dtype is not None and dtype != torch.float32:
            pytest.skip("the Triton interpreter runs this in float32 only")


# the Triton interpreter takes seconds per kernel call (mf-p and mf-lu much longer): these only
INTERPRETED_METHODS = ("sd", "ce", "mf-lf")


TARGETS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("cpu", "cpu"), id="cpu-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu", marks=pytest.mark.interpret),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]
# the targets compared with the reference (the reference on CPU tensors is the reference)
COMPARED = [p for p in TARGETS if p.id != "torch-cpu"]
CPU_TARGETS = [p for p in TARGETS if p.values[0][1] == "cpu"]


def _target(request) -> Target:
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        backends.select(backend, torch.device(device))
    except RuntimeError as err:
        pytest.skip(str(err))
    return Target(backend, device)


@pytest.fixture(params=TARGETS)
def target(request) -> Target:
    return _target(request)


@pytest.fixture(params=COMPARED)
def compared(request) -> Target:
    return _target(request)


@pytest.fixture(params=CPU_TARGETS)
def cpu_target(request) -> Target:
    return _target(request)


def assert_distributions(soft: torch.Tensor) -> None:
    soft = soft.detach().cpu().double()
    assert bool((soft >= 0).all()) and bool(torch.isfinite(soft).all())
    ones = torch.ones(soft.shape[0], dtype=torch.float64)
    torch.testing.assert_close(soft.sum(dim=1), ones, atol=1e-5, rtol=0)


def on_cpu(info: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in info.items()}


def assert_agrees(method, dtype, soft, info, ref, ref_info, *, iterations_within: int | None = None) -> None:
    """``soft`` matches the reference ``ref`` on the rows both converged on (every row for the
    closed forms), and converges where the reference does (on at least 80% of those rows)."""
    soft, info = soft.cpu(), on_cpu(info)
    rows = torch.ones(ref.shape[0], dtype=torch.bool)
    if method in ITERATIVE:
        rows = info["converged"] & ref_info["converged"]
        assert int(rows.sum()) >= 0.8 * int(ref_info["converged"].sum()), (
            f"converged on {info['converged'].tolist()}, the reference on {ref_info['converged'].tolist()}"
        )
        if iterations_within is not None:
            gap = max_diff(info["iterations"][rows], ref_info["iterations"][rows])
            assert gap <= iterations_within, (info["iterations"].tolist(), ref_info["iterations"].tolist())
    err = max_diff(soft[rows], ref[rows])
    assert err <= tolerance(method, dtype), f"{method} {dtype}: max |q - reference| = {err:.3g}"


def problem_for(seed: int, **spec):
    """``make``'s problems with teachers sharing at least three classes, so that every method's
    answer is well determined (mf-lu's scales need two shared classes, and a third to check fit)."""
    spec.setdefault("link", 3)
    spec.setdefault("coverage", 0.5)
    return make(seed, **spec)


# ---------------------------------------------------------------------------------------- against the reference
CASES = {
    "subsets": dict(seed=0, batch=17, classes=23, teachers=5, noise=0.3),
    "windows-logits": dict(
        seed=1, batch=9, classes=31, teachers=7, sets="windows", noise=0.3, inputs="logits", temperature=2.5
    ),
    "one-row-consistent": dict(seed=2, batch=1, classes=13, teachers=3, weights=True),
    "more-teachers-than-classes": dict(
        seed=3, batch=10, classes=6, teachers=9, coverage=0.5, noise=0.5, temperature=0.5
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("method", NAMES)
def test_matches_reference(compared, method, dtype, case):
    if compared.interpreted and case != "subsets":
        pytest.skip("the Triton interpreter runs one case")
    spec = dict(CASES[case])
    spec.update(compared.shape(spec.pop("batch"), spec.pop("classes"), spec.pop("teachers")))
    problem = problem_for(**spec)
    soft, info = problem.estimate(method, compared.backend, dtype, compared.device)
    ref, ref_info = problem.estimate(method, "torch", dtype)
    assert soft.device.type == compared.device and soft.dtype == compute_dtype(dtype) and soft.shape == ref.shape
    assert info["backend"] == compared.backend
    assert_distributions(soft)
    # ce is the same algorithm everywhere: the same steps, up to a step where rounding straddles tol
    assert_agrees(method, dtype, soft, info, ref, ref_info, iterations_within=1 if method == "ce" else None)
    if method in ITERATIVE:
        assert int(ref_info["converged"].sum()) >= (problem.batch + 1) // 2  # the comparison is not vacuous
        assert int(info["iterations"].max()) <= DEFAULT_MAX_ITER


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("method", NAMES)
def test_input_dtypes(target, method, dtype):
    """Every float dtype is read as it is: float64 in, float64 out; anything narrower computes in
    float32. The answer matches the reference on the same (rounded) inputs, and the float64 answer
    up to the rounding of the inputs."""
    target.limit(method, full=True)
    problem = problem_for(11, noise=0.3, weights=True, **target.shape(6, 10, 4))
    soft, info = problem.estimate(method, target.backend, dtype, target.device)
    assert soft.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert soft.device.type == target.device and info["backend"] == target.backend
    assert_distributions(soft)
    if target.backend != "torch" or target.device != "cpu":
        ref, ref_info = problem.estimate(method, "torch", dtype)
        assert_agrees(method, dtype, soft, info, ref, ref_info)
    exact, _ = problem.estimate(method, "torch", torch.float64)
    err = max_diff(soft.cpu(), exact)
    assert err <= tolerance(method, dtype, "input"), f"{err:.3g} from the float64 answer"


@pytest.mark.parametrize("method", NAMES)
def test_mixed_input_dtypes_compute_in_the_widest(target, method):
    target.limit(method, full=True)
    problem = problem_for(12, noise=0.2, **target.shape(5, 9, 3))
    outputs = [x.to(dtype=d, device=target.device) for x, d in zip(problem.outputs, FLOAT_DTYPES[::-1])]
    soft, _ = problem.estimate(method, target.backend, outputs=outputs)
    assert soft.dtype == torch.float64  # teacher 0 is float64
    ref, _ = problem.estimate(method, "torch", outputs=[x.cpu() for x in outputs])
    torch.testing.assert_close(soft.cpu(), ref, atol=tolerance(method, torch.float64), rtol=0)
    narrow = (torch.float32, torch.bfloat16, torch.float16)
    outputs = [x.to(dtype=d, device=target.device) for x, d in zip(problem.outputs, narrow)]
    assert problem.estimate(method, target.backend, outputs=outputs)[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("method", NAMES)
def test_numpy_in_numpy_out(cpu_target, method, dtype):
    cpu_target.limit(method, dtype, full=True)
    problem = problem_for(13, noise=0.3, **cpu_target.shape(6, 10, 4))
    tensors = problem.tensors(dtype)
    soft, info = problem.estimate(method, cpu_target.backend, outputs=[x.numpy() for x in tensors])
    assert isinstance(soft, np.ndarray) and soft.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    assert info["backend"] == cpu_target.backend
    expected, _ = problem.estimate(method, cpu_target.backend, outputs=tensors)
    np.testing.assert_array_equal(soft, expected.numpy())
    # one torch tensor among numpy arrays: torch out
    mixed = [tensors[0], *(x.numpy() for x in tensors[1:])]
    got, _ = problem.estimate(method, cpu_target.backend, outputs=mixed)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("method", NAMES)
def test_empty_batch(target, method):
    problem = problem_for(14, **target.shape(3, 9, 3))
    for dtype in (torch.float64, torch.float32):
        outputs = [x[:0] for x in problem.tensors(dtype, target.device)]
        soft, info = problem.estimate(method, target.backend, outputs=outputs)
        assert soft.shape == (0, problem.num_classes) and soft.dtype == dtype and soft.device.type == target.device
        assert info["backend"] == target.backend
        if method in ITERATIVE:
            for key in ("iterations", "residual", "converged"):
                assert info[key].shape == (0,), key
    if target.device == "cpu":
        numpy_soft = uhc_fast.estimate(
            [x[:0].numpy() for x in problem.outputs], problem.sets, method, backend=target.backend
        )
        assert isinstance(numpy_soft, np.ndarray) and numpy_soft.shape == (0, problem.num_classes)


@pytest.mark.parametrize("batch", [1, 2, 7, 8, 9, 33])
@pytest.mark.parametrize("method", NAMES)
def test_batch_sizes_around_the_tile_width(compared, method, batch):
    """Tiles of W samples (and spare lanes in the last tile) must not change any sample's answer:
    each row equals the answer of the same row solved alone."""
    compared.limit()
    problem = problem_for(15, batch=batch, classes=11, teachers=4, noise=0.3)
    soft, info = problem.estimate(method, compared.backend, torch.float64, compared.device)
    alone, _ = problem.estimate(method, compared.backend, outputs=[x[-1:].to(compared.device) for x in problem.outputs])
    assert soft.shape == (batch, problem.num_classes)
    torch.testing.assert_close(soft[-1:], alone, atol=tolerance(method, torch.float64), rtol=0)
    ref, ref_info = problem.estimate(method, "torch", torch.float64)
    assert_agrees(method, torch.float64, soft, info, ref, ref_info)


# ---------------------------------------------------------------------------------------- strides
def strided_views(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``x`` through a non-contiguous view."""
    if layout == "transposed":  # column-major
        view = x.t().contiguous().t()
    elif layout == "column-strided":
        wide = torch.full((x.shape[0], 3 * x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
        wide[:, ::3] = x
        view = wide[:, ::3]
    elif layout == "row-strided":
        tall = torch.full((2 * x.shape[0], x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
        tall[1::2] = x
        view = tall[1::2]
    else:  # a window into a larger array, at an offset
        big = torch.full((x.shape[0] + 2, x.shape[1] + 3), float("nan"), dtype=x.dtype, device=x.device)
        big[2:, 1:-2] = x
        view = big[2:, 1:-2]
    assert torch.equal(view, x) and (not view.is_contiguous() or view.storage_offset() > 0)
    return view


@pytest.mark.parametrize("layout", ["transposed", "column-strided", "row-strided", "offset"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("method", NAMES)
def test_non_contiguous_inputs(target, method, dtype, layout):
    """Any strides (NaN around the views: nothing outside them may be read). The compiled backends
    read the views natively, with the same arithmetic: bit for bit the contiguous answer."""
    target.limit(method, full=method == "ce")
    problem = problem_for(16, noise=0.3, **target.shape(9, 11, 4))
    tensors = problem.tensors(dtype, target.device)
    expected, _ = problem.estimate(method, target.backend, outputs=tensors)
    got, info = problem.estimate(method, target.backend, outputs=[strided_views(x, layout) for x in tensors])
    assert info["backend"] == target.backend
    if target.backend in ("cpu", "cuda"):
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, atol=tolerance(method, dtype), rtol=0)


@pytest.mark.parametrize("method", NAMES)
def test_non_contiguous_numpy_inputs(cpu_target, method):
    cpu_target.limit(method, full=method == "ce")
    problem = problem_for(17, noise=0.3, **cpu_target.shape(7, 10, 3))
    arrays = [x.numpy() for x in problem.tensors(torch.float32)]
    expected, _ = problem.estimate(method, cpu_target.backend, outputs=arrays)
    fortran = [np.asfortranarray(x) for x in arrays]
    sliced = []
    for x in arrays:
        wide = np.full((x.shape[0] * 2, x.shape[1] * 2), np.nan, dtype=x.dtype)
        wide[::2, 1::2] = x
        sliced.append(wide[::2, 1::2])
    swapped = [x.astype(x.dtype.newbyteorder(">")) for x in arrays]  # big-endian storage
    for variant in (fortran, sliced, swapped):
        got, _ = problem.estimate(method, cpu_target.backend, outputs=variant)
        assert isinstance(got, np.ndarray)
        if cpu_target.backend == "cpu":
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, atol=tolerance(method, torch.float32), rtol=0)


@pytest.mark.parametrize("method", ["sd", "ce"])
def test_numpy_inputs_with_negative_strides(cpu_target, method):
    """Reversed numpy views (``x[:, ::-1]``, ``np.flip``) are arrays like any other: their class
    set is read in the reversed order."""
    problem = problem_for(18, noise=0.3, **cpu_target.shape(5, 9, 3))
    arrays = [x.numpy() for x in problem.outputs]
    expected = uhc_fast.estimate(arrays, problem.sets, method, backend=cpu_target.backend)
    reversed_sets = [cs[::-1] for cs in problem.sets]
    got = uhc_fast.estimate([x[:, ::-1] for x in arrays], reversed_sets, method, backend=cpu_target.backend)
    np.testing.assert_allclose(got, expected, atol=tolerance(method, torch.float64), rtol=0)


# -------------------------------------------------------------------------------- weights, uncovered classes, prior
@pytest.mark.parametrize("method", NAMES)
def test_weights_uncovered_classes_and_prior(target, method):
    target.limit(method, full=True)
    problem = problem_for(19, noise=0.2, weights=True, uncovered=2, alpha=0.05, **target.shape(7, 10, 4))
    uncovered = sorted(set(range(problem.num_classes)) - {c for cs in problem.sets for c in cs})
    assert len(uncovered) == 2
    soft, info = problem.estimate(method, target.backend, torch.float64, target.device)
    assert soft.shape == (problem.batch, problem.num_classes)
    assert bool((soft[:, uncovered] == 0).all())
    assert info["uncovered_classes"] == uncovered and info["alpha"] == 0.05 and info["components"] == 1
    assert_distributions(soft)
    if target.backend != "torch":
        ref, ref_info = problem.estimate(method, "torch", torch.float64)
        assert_agrees(method, torch.float64, soft, info, ref, ref_info)
    # the weights matter, and scaling them all (the prior's included) does not
    scaled, _ = problem.estimate(
        method, target.backend, torch.float64, target.device, weights=[3 * w for w in problem.weights], alpha=0.15
    )
    torch.testing.assert_close(scaled, soft, atol=tolerance(method, torch.float64), rtol=0)
    unweighted, _ = problem.estimate(method, target.backend, torch.float64, target.device, weights=None)
    assert max_diff(unweighted, soft) > 1e3 * tolerance(method, torch.float64)


@pytest.mark.parametrize("method", NAMES)
def test_disconnected_classes_get_the_default_prior(target, method):
    target.limit(method, full=True)
    sets = [[0, 1, 2], [1, 2, 3], [4, 5, 6], [6, 7, 5]]
    q = random_soft_labels(4, 8, 20, sharpness=1.0)
    outputs = [x.to(target.device) for x in consistent_outputs(q, sets)]
    with pytest.warns(uhc_fast.DisconnectedClassesWarning, match=r"2 components \[\[0, 1, 2, 3\], \[4, 5, 6, 7\]\]"):
        soft, info = uhc_fast.estimate(outputs, sets, method, backend=target.backend, return_info=True)
    assert info["alpha"] == DEFAULT_DISCONNECTED_ALPHA and info["components"] == 2
    assert_distributions(soft)
    explicit = uhc_fast.estimate(outputs, sets, method, backend=target.backend, alpha=DEFAULT_DISCONNECTED_ALPHA)
    assert torch.equal(explicit, soft)
    if target.backend != "torch":
        with pytest.warns(uhc_fast.DisconnectedClassesWarning):
            ref, ref_info = uhc_fast.estimate(
                [x.cpu() for x in outputs], sets, method, backend="torch", return_info=True
            )
        assert_agrees(method, torch.float64, soft, info, ref, ref_info)
    # within each component the teachers decide, up to the prior's pull (sd keeps its bias; in mf-lu the
    # prior is a teacher with its own free scale, whose pull is larger)
    if method in ("ce", "mf-p", "mf-lf"):
        soft = soft.cpu()
        for part in ([0, 1, 2, 3], [4, 5, 6, 7]):
            expected = q[:, part] / q[:, part].sum(dim=1, keepdim=True)
            got = soft[:, part] / soft[:, part].sum(dim=1, keepdim=True)
            torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------- iterations and tolerance
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("method", ITERATIVE)
def test_iteration_cap_and_tolerance(target, method, dtype):
    target.limit(method, dtype, full=True)
    problem = problem_for(21, noise=0.8, **target.shape(7, 19, 5))
    compare = target.backend != "torch" or target.device != "cpu"
    run = lambda **kw: problem.estimate(method, target.backend, dtype, target.device, **kw)
    reference = lambda **kw: problem.estimate(method, "torch", dtype, **kw)
    tight = default_tol(compute_dtype(dtype)) / 1000

    # max_iter=0: the start point, no step taken
    soft, info = run(max_iter=0)
    assert int(info["iterations"].max()) == 0
    assert_distributions(soft)
    assert not bool(info["converged"].any())  # noisy teachers: no start point is optimal
    if compare:
        ref, _ = reference(max_iter=0)
        torch.testing.assert_close(soft.cpu(), ref, atol=tolerance(method, dtype), rtol=0)

    # a cap that stops most rows: at most that many steps, the reference's point
    soft, info = run(max_iter=2, tol=tight)
    assert int(info["iterations"].max()) <= 2 and not bool(info["converged"].all())
    assert info["tol"] == tight
    assert bool((info["residual"][info["converged"]] <= tight).all())
    if compare:
        ref, _ = reference(max_iter=2, tol=tight)
        torch.testing.assert_close(soft.cpu(), ref, atol=tolerance(method, dtype), rtol=0)

    # a loose tolerance: fewer steps, and every converged row meets it
    full_soft, full = run()
    loose_soft, loose = run(tol=1e-3)
    assert loose["tol"] == 1e-3 and full["tol"] == default_tol(compute_dtype(dtype))
    assert bool(loose["converged"].all()) and bool(full["converged"].all())
    assert bool((loose["iterations"] <= full["iterations"]).all())
    for info, tol in ((loose, 1e-3), (full, full["tol"])):
        assert bool((info["residual"][info["converged"]] <= tol).all())
        if "step" in info:
            assert bool((info["step"][info["converged"]] <= tol).all())
    assert max_diff(loose_soft.cpu(), full_soft.cpu()) <= 1e-2


# ---------------------------------------------------------------------------------------- info
@pytest.mark.parametrize("method", NAMES)
def test_info_fields(target, method):
    problem = problem_for(22, noise=0.3, **target.shape(6, 10, 4))
    for dtype in (torch.float32,) if target.interpreted else (torch.float64, torch.float32):
        soft, info = problem.estimate(method, target.backend, dtype, target.device)
        _, ref_info = problem.estimate(method, "torch", dtype)
        assert set(info) == set(ref_info), f"{sorted(info)} != the reference's {sorted(ref_info)}"
        assert info["method"] == method and info["backend"] == target.backend
        assert info["alpha"] == 0.0 and info["uncovered_classes"] == [] and info["components"] == 1
        if method not in ITERATIVE:
            assert "iterations" not in info and "residual" not in info and "converged" not in info
            continue
        assert info["tol"] == default_tol(soft.dtype)
        batch = problem.batch
        assert info["iterations"].dtype == torch.int32 and info["converged"].dtype == torch.bool
        for key, value in info.items():
            if isinstance(value, torch.Tensor):
                assert value.shape == (batch,) and value.device == soft.device, key
                if value.is_floating_point():
                    assert value.dtype == soft.dtype and bool(torch.isfinite(value).all()), key
        converged = info["converged"]
        assert bool((info["residual"][converged] <= info["tol"]).all())
        assert bool((info["step"][converged] <= info["tol"]).all())
        assert bool((info["iterations"] >= 0).all())
        if method == "ce":  # the absolute KKT residual sits below the relative one, scaled by n_l / sum(w)
            assert bool((info["abs_residual"] <= info["residual"] + 1e-12).all())


@pytest.mark.interpret
def test_triton_is_usable_under_the_interpreter():
    pytest.importorskip("triton")
    report = uhc_fast.info()["triton"]
    assert report["available"], report.get("reason")
    assert "cpu" in report["devices"]


@pytest.mark.interpret
def test_triton_beyond_its_teacher_limit_runs_the_reference_and_says_so():
    try:
        chosen = backends.select("triton", torch.device("cpu"))
    except RuntimeError as err:
        pytest.skip(str(err))
    from uhc_fast import kernels

    assert chosen.name == "triton"
    teachers = kernels.MAX_NEWTON_TEACHERS + 1
    sets = [[i, i + 1] for i in range(teachers)]  # a chain
    q = random_soft_labels(2, teachers + 1, 23)
    soft, info = uhc_fast.estimate(consistent_outputs(q, sets), sets, "ce", backend="triton", return_info=True)
    assert info["backend"] == "torch"
    torch.testing.assert_close(soft, q, atol=tolerance("ce", torch.float64, "recovery"), rtol=0)


# ---------------------------------------------------------------------------------------- choosing the backend
def test_auto_selection(monkeypatch):
    problem = problem_for(24, batch=3)
    monkeypatch.delenv("UHC_FAST_BACKEND", raising=False)
    usable = lambda name: not isinstance(backends.load(name), str)
    expected_cpu = "cpu" if usable("cpu") else "torch"
    _, info = problem.estimate("ce", "auto")
    assert info["backend"] == expected_cpu
    # CUDA tensors: compiled CUDA, then Triton, then the reference
    runs_cuda = lambda name: usable(name) and "cuda" in backends.load(name).device_types
    expected_cuda = next(name for name in ("cuda", "triton", "torch") if runs_cuda(name))
    assert backends.select("auto", torch.device("cuda"), "ce").name == expected_cuda
    # the environment sets the default; a forced backend overrides it
    for name in ("torch", expected_cpu):
        monkeypatch.setenv("UHC_FAST_BACKEND", name)
        assert problem.estimate("ce", "auto")[1]["backend"] == name
        assert problem.estimate("ce", "torch")[1]["backend"] == "torch"
    monkeypatch.setenv("UHC_FAST_BACKEND", "nope")
    with pytest.raises(InputError, match=r"UHC_FAST_BACKEND='nope': expected one of") as caught:
        problem.estimate("ce", "auto")
    assert caught.value.argument == "UHC_FAST_BACKEND"


def test_info_reports_the_auto_choice_per_device(monkeypatch):
    """``info()["auto"]`` is what ``backend="auto"`` picks for tensors of each device type."""
    monkeypatch.delenv("UHC_FAST_BACKEND", raising=False)
    report = uhc_fast.info()["auto"]
    assert set(report) == {"cpu", "cuda"}
    for device, name in report.items():
        assert name == backends.select("auto", torch.device(device), "ce").name, device


def test_forced_backends_that_cannot_run_say_why():
    problem = problem_for(25, batch=3)
    report = uhc_fast.info()
    for name in ("cuda", "triton", "cpu"):
        entry = report[name]
        if not entry["available"]:
            with pytest.raises(RuntimeError, match=rf"backend='{name}' is not available: ") as caught:
                problem.estimate("ce", name)
            assert entry["reason"] in str(caught.value)
        elif "cpu" not in entry["devices"]:
            with pytest.raises(RuntimeError, match=rf"backend='{name}' is not available: runs on .* these are on cpu"):
                problem.estimate("ce", name)
    if report["cpu"]["available"]:
        with pytest.raises(
            RuntimeError, match=r"backend='cpu' is not available: runs on \('cpu',\) tensors, these are on cuda"
        ):
            backends.select("cpu", torch.device("cuda"), "ce")
        meta = [torch.empty(3, len(cs), device="meta") for cs in problem.sets]
        with pytest.raises(RuntimeError, match=r"these are on meta"):
            uhc_fast.estimate(meta, problem.sets, "ce", backend="cpu")
    with pytest.raises(InputError, match=r"backend='tpu': expected one of") as caught:
        problem.estimate("ce", "tpu")
    assert caught.value.argument == "backend"


def test_inputs_requiring_grad_raise(target):
    problem = problem_for(26, **target.shape(4, 8, 3))
    outputs = problem.tensors(torch.float32, target.device)
    outputs[1].requires_grad_(True)
    with pytest.raises(InputError, match=r"teacher 1: outputs require grad.*detach\(\).*UHCLoss") as caught:
        problem.estimate("ce", target.backend, outputs=outputs)
    assert caught.value.teacher == 1 and caught.value.row is None
    with torch.no_grad():
        soft, info = problem.estimate("ce", target.backend, outputs=outputs)
    assert not soft.requires_grad and info["backend"] == target.backend
    detached, _ = problem.estimate("ce", target.backend, outputs=[x.detach() for x in outputs])
    assert torch.equal(soft, detached)


# ---------------------------------------------------------------------------------------- validation
SETS = [[0, 1, 2], [2, 3]]


def valid_outputs(batch: int = 4, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.softmax(torch.randn(batch, len(cs), generator=gen, dtype=torch.float64), dim=1).to(dtype) for cs in SETS
    ]


def _nan(o):
    o[1][2, 0] = float("nan")


def _inf_logits(o):
    o[0][3, 1] = float("inf")


def _negative(o):
    o[0][1] = torch.tensor([1.2, -0.2, 0.0])


def _all_zero(o):
    o[1][3] = 0


def _sum_off(o):
    o[1][0] = torch.tensor([0.3, 0.3])


def _first_teacher_wins(o):
    o[0][3] = torch.tensor([0.5, 0.2, 0.1])  # sum off
    o[1][0, 1] = float("nan")


def _checks_in_order(o):  # not finite before negative before all zero before sum off, whatever the rows
    o[0][0] = torch.tensor([0.5, 0.2, 0.1])
    o[0][1] = 0
    o[0][2] = torch.tensor([1.5, -0.5, 0.0])
    o[0][3, 2] = float("-inf")


def _smallest_row_wins(o):  # rows scattered over the batch (threads, tiles, programs): the smallest is reported
    batch = o[0].shape[0]
    for row in (batch * 777 // 1000, batch * 123 // 1000, batch - 1, batch // 2):
        o[0][row] = torch.tensor([0.7, 0.7, -0.4])


VALIDATION = {
    "nan": (_nan, "probs", 4, "teacher 1, row 2: outputs contain NaN or Inf"),
    "inf-logits": (_inf_logits, "logits", 4, "teacher 0, row 3: outputs contain NaN or Inf"),
    "negative": (_negative, "probs", 4, "teacher 0, row 1: negative probability (did you mean inputs='logits'?)"),
    "all-zero": (_all_zero, "probs", 4, "teacher 1, row 3: all probabilities are zero"),
    "sum-off": (
        _sum_off,
        "probs",
        4,
        "teacher 1, row 0: probabilities sum to 0.6, not 1 (tolerance 0.0001; did you mean inputs='logits'?)",
    ),
    "first-teacher": (_first_teacher_wins, "probs", 4, "teacher 0, row 3: probabilities sum to 0.8"),
    "check-order": (_checks_in_order, "probs", 4, "teacher 0, row 3: outputs contain NaN or Inf"),
    "smallest-row": (_smallest_row_wins, "probs", 1000, "teacher 0, row 123: negative probability"),
}


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("case", list(VALIDATION))
def test_validation_errors(target, case, strided):
    """NaN/Inf, negative, all-zero and off-sum rows raise the same InputError, naming the first
    failing teacher and its first failing row, on every backend (the compiled ones check natively)."""
    corrupt, kind, batch, message = VALIDATION[case]
    if case == "smallest-row" and target.interpreted:  # the interpreter validates inside its kernels
        batch, message = 12, "teacher 0, row 1: negative probability"
    outputs = valid_outputs(batch)
    corrupt(outputs)
    outputs = [x.t().contiguous().t() if strided else x for x in outputs]
    outputs = [x.to(target.device) for x in outputs]
    errors = {}
    for backend in {"torch", target.backend}:
        with pytest.raises(InputError) as caught:
            uhc_fast.estimate(outputs, SETS, "ce", inputs=kind, backend=backend)
        errors[backend] = caught.value
    err = errors[target.backend]
    assert str(err).startswith(message), str(err)
    assert str(err) == str(errors["torch"])
    assert (err.teacher, err.row, err.detail) == (errors["torch"].teacher, errors["torch"].row, errors["torch"].detail)
    assert err.argument is None and int(message.split("row ")[1].split(":")[0]) == err.row


@pytest.mark.parametrize(
    ("dtype", "total", "ok"),
    [
        (torch.float16, 1.0078125, True),
        (torch.float16, 1.03125, False),
        (torch.bfloat16, 1.0234375, True),
        (torch.bfloat16, 1.0625, False),
        (torch.float32, 1 + 2**-16, True),
        (torch.float32, 1 + 2**-12, False),
        (torch.float64, 1 + 2**-24, True),
        (torch.float64, 1 + 2**-18, False),
    ],
)
def test_sum_tolerance_follows_the_dtype(target, dtype, total, ok):
    outputs = [x.to(dtype) for x in valid_outputs(3, torch.float64)]
    outputs[1][2] = torch.tensor([0.5, total - 0.5], dtype=torch.float64).to(dtype)
    assert float(outputs[1][2].double().sum()) == total
    outputs = [x.to(target.device) for x in outputs]
    if ok:
        soft = uhc_fast.estimate(outputs, SETS, "ce", backend=target.backend)
        assert_distributions(soft)
    else:
        with pytest.raises(
            InputError, match=r"teacher 1, row 2: probabilities sum to .*, not 1 \(tolerance "
        ) as caught:
            uhc_fast.estimate(outputs, SETS, "ce", backend=target.backend)
        assert (caught.value.teacher, caught.value.row) == (1, 2)


def test_logit_inputs_may_be_negative_and_mixed_kinds(target):
    outputs = [x.to(target.device) for x in valid_outputs(3)]
    logits = torch.log(outputs[1]) - 5.0
    soft = uhc_fast.estimate([outputs[0], logits], SETS, "ce", inputs=("probs", "logits"), backend=target.backend)
    expected = uhc_fast.estimate(outputs, SETS, "ce", backend=target.backend)
    torch.testing.assert_close(soft, expected, atol=tolerance("ce", torch.float32), rtol=0)
    zeros = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    for method in target.methods:  # exact zeros are valid probabilities for every method
        assert_distributions(
            uhc_fast.estimate([z.to(target.device) for z in zeros], SETS, method, backend=target.backend)
        )


# ---------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("method", ["ce", "mf-lf"])
def test_strided_inputs_on_a_side_stream(backend, method):
    try:
        backends.select(backend, torch.device("cuda"))
    except RuntimeError as err:
        pytest.skip(str(err))
    problem = problem_for(27, batch=64, classes=19, teachers=5, noise=0.3)
    expected, _ = problem.estimate(method, "torch", torch.float32)
    outputs = [strided_views(x, "column-strided") for x in problem.tensors(torch.float32, "cuda")]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got, info = problem.estimate(method, backend, outputs=outputs)
    torch.cuda.current_stream().wait_stream(stream)
    assert info["backend"] == backend
    torch.testing.assert_close(got.cpu(), expected, atol=tolerance(method, torch.float32), rtol=0)
