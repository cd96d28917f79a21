"""``uhc_fast.estimate`` against independent float64 oracles (``tests/oracles.py``).

The oracles are written from ``../shared/uhc-math.md`` with numpy/scipy and share no code with the
library: this module imports only the public names ``uhc_fast.estimate``, ``uhc_fast.info`` and the
warning classes. Every check runs on each backend ``uhc_fast.info()`` reports usable for the inputs'
device: the CPU ones on CPU tensors (Triton, which runs there through its interpreter, on tiny
problems behind the ``interpret`` marker) and ``cuda``/``triton`` on CUDA tensors (``gpu`` marker).

What is asserted:

- ``ce`` and ``mf-lf`` match their oracles to 1e-7 (max abs difference of soft labels) in float64 and
  1e-4 in float32 computation (float32/float16/bfloat16 inputs), at the default ``tol``/``max_iter``;
  ``sd`` to rounding;
- no row reported ``converged`` is off by more than 1e-3: from the global ``ce`` oracle, and for the
  non-convex ``mf-p``/``mf-lu`` from the local minimum the oracle reaches when started at the
  library's answer (whose objective must not drop by more than a small relative amount);
- exact recovery from consistent teachers (``mf-p``; ``mf-lu`` at different teacher temperatures);
- backends agree where both converge; ``mf-lu`` converges on >= 99% of noisy random-subset rows;
- the regression cases of the issue, and that an invalid ``eps`` is refused.

Inputs are generated in float64 and cast to the tested dtype; the oracle then solves the float64
image of exactly what the library was given, so the tolerances measure the library's arithmetic,
not the rounding of its inputs.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from scipy import optimize

import uhc_fast

from . import oracles as orc

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |q - oracle| for ce and mf-lf (the numbers): by computation dtype (float64 iff an input is)
ACCURACY = {"float64": 1e-7, "float32": 1e-4, "float16": 1e-4, "bfloat16": 1e-4}
SD_ACCURACY = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-6, "bfloat16": 1e-6}
# exact recovery of mf-lu from consistent teachers (the numbers)
LU_RECOVERY = {"float64": 1e-6, "float32": 1e-3}
# no row reported converged may be further than this from the oracle
CONVERGED_ERROR = 1e-3
# a converged mf-p/mf-lu row is a local minimum: polishing it lowers the objective by at most
# REL * objective + FLOOR * sum(w)
POLISH_REL = {"float64": 1e-6, "float32": 1e-4}
POLISH_FLOOR = {"float64": 1e-14, "float32": 1e-9}
ITERATIVE = ("ce", "mf-p", "mf-lu")

# hypothesis: examples are opaque seeds, so shrinking buys little and a failing property would spend
# most of the time budget on it; derandomized so that a run is reproducible
FAST = settings(
    max_examples=30, deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate)
)
SLOWER = settings(FAST, max_examples=15)


# ---------------------------------------------------------------------------------------- backends
def usable_backends(device: str) -> list[str]:
    """Backends ``uhc_fast.info()`` reports available for tensors on ``device``."""
    report = uhc_fast.info()
    return sorted(
        name
        for name, entry in report.items()
        if isinstance(entry, dict) and entry.get("available") and device in entry.get("devices", ())
    )


_ON_CPU = usable_backends("cpu")
# Triton on CPU tensors is the interpreter: tiny problems only, in the `interpret` tests
CPU_BACKENDS = [name for name in _ON_CPU if name != "triton"]
TRITON_ON_CPU = "triton" in _ON_CPU
GPU_BACKENDS = ("cuda", "triton")


def require_gpu_backend(backend: str) -> None:
    if backend not in usable_backends("cuda"):
        reason = uhc_fast.info().get(backend, {})
        pytest.skip(f"backend {backend!r} is not usable on CUDA tensors here: {reason}")


# ---------------------------------------------------------------------------------------- running
def solve(problem: orc.Problem, method: str, backend: str, dtype: str, device: str = "cpu", **extra):
    """Run ``estimate``; returns ``(soft as float64 numpy, info, the float64 image of its inputs)``."""
    tensors = [torch.from_numpy(np.ascontiguousarray(x)).to(DTYPES[dtype]) for x in problem.outputs]
    seen = [t.double().numpy() for t in tensors]
    options = {**problem.options(), **extra}
    soft, info = uhc_fast.estimate(
        [t.to(device) for t in tensors], problem.sets, method, backend=backend, return_info=True, **options
    )
    assert tuple(soft.shape) == (problem.batch, problem.num_classes)
    assert soft.device.type == torch.device(device).type
    expected_dtype = torch.float64 if dtype == "float64" else torch.float32
    assert soft.dtype == expected_dtype, f"soft labels in {soft.dtype}, expected {expected_dtype}"
    return soft.detach().cpu().double().numpy(), info, seen


def converged_rows(info) -> np.ndarray:
    return np.asarray(torch.as_tensor(info["converged"]).cpu(), dtype=bool)


def compute_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def assert_finite(soft: np.ndarray, info, problem) -> None:
    bad = ~np.isfinite(soft).all(axis=1)
    assert not bad.any(), f"non-finite soft labels on rows {np.flatnonzero(bad)[:10].tolist()} of {problem!r}"
    for key in ("residual", "iterations"):
        if key in info:
            value = np.asarray(torch.as_tensor(info[key]).cpu(), dtype=np.float64)
            assert np.isfinite(value).all(), f"non-finite info[{key!r}] {value} on {problem!r}"


def assert_close(soft: np.ndarray, expected: np.ndarray, tol: float, what: str) -> None:
    err = np.abs(soft - expected).max(axis=1)
    err = np.where(np.isnan(err), np.inf, err)
    bad = np.flatnonzero(~(err <= tol))
    assert bad.size == 0, (
        f"{what}: max |q - oracle| = {err.max():.3g} > {tol:g} on rows {bad[:10].tolist()} (of {err.size})"
    )


def local_minimum_failures(method, problem, soft, seen, rows, dtype) -> list[str]:
    """For each row in ``rows``: polish the library's answer with the float64 oracle; report rows
    where that lowers the objective by more than the allowed amount or moves q by more than
    :data:`CONVERGED_ERROR`, unless the answer is within :data:`CONVERGED_ERROR` of the oracle's own
    (multi-start) answer. (Polishing restarts from the library's q alone, which cannot rebuild the
    scales where q saturates at a degenerate optimum: a class seen only by a teacher whose scale
    goes to its bound.)"""
    check = {"mf-p": orc.mf_p_check_row, "mf-lu": orc.mf_lu_check_row}[method]
    weights = 1.0 if problem.weights is None else float(np.sum(problem.weights))
    rel, floor = POLISH_REL[compute_dtype(dtype)], POLISH_FLOOR[compute_dtype(dtype)] * weights
    failures = []
    oracle = None
    for b in rows:
        f_lib, f_pol, q_pol = check(problem, soft[b], int(b), seen)
        err = float(np.abs(soft[b] - q_pol).max())
        drop = f_lib - f_pol
        if not (err <= CONVERGED_ERROR and drop <= rel * f_lib + floor):
            oracle = orc.ORACLES[method](problem, seen) if oracle is None else oracle
            if float(np.abs(soft[b] - oracle[b]).max()) <= CONVERGED_ERROR:
                continue
            failures.append(
                f"row {b}: |q - oracle polish| = {err:.3g}, objective {f_lib:.6g} -> {f_pol:.6g} "
                f"(drop {drop / max(f_lib, 1e-300):.3g} relative)"
            )
    return failures


# ---------------------------------------------------------------------------------------- strategies
@st.composite
def problems(
    draw,
    families=orc.FAMILIES,
    noises=(0.0, 0.3),
    inputs=("probs", "logits"),
    temperatures=(1.0, 1.0, 0.5, 2.5),
    max_batch=4,
    sharpness=None,
):
    """A problem of a random family (see ``oracles.FAMILIES``), seed, input kind, temperature,
    noise level (0 = consistent teachers) and with or without per-teacher weights."""
    return orc.make_problem(
        draw(st.sampled_from(families)),
        draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, max_batch)),
        noise=draw(st.sampled_from(noises)),
        inputs=draw(st.sampled_from(inputs)),
        temperature=draw(st.sampled_from(temperatures)),
        weighted=draw(st.booleans()),
        sharpness=sharpness,
    )


@st.composite
def scaled_problems(draw, noises=(0.0, 0.1), max_batch=4):
    """mf-lu-style logits: teachers at different temperatures (scales v with weighted mean 1)."""
    return orc.make_scaled_problem(
        draw(st.integers(0, 2**31 - 1)),
        family=draw(st.sampled_from(orc.LU_FAMILIES)),
        batch=draw(st.integers(1, max_batch)),
        noise=draw(st.sampled_from(noises)),
        temperature=draw(st.sampled_from((1.0, 0.5, 2.5))),
        weighted=draw(st.booleans()),
    )


CONSISTENT_FAMILIES = tuple(f for f in orc.FAMILIES if f != "disconnected")  # no prior: truth is the answer


def has_exact_truth(problem: orc.Problem, space: str) -> bool:
    """The generating q is the exact answer: consistent teachers, no eps clamp in ``space``."""
    if problem.truth is None:
        return False
    if space == "logits" and problem.inputs == "probs":
        return problem.notes.get("min_p", 1.0) >= 10 * problem.eps
    return True


# ---------------------------------------------------------------------------------------- discovery
def test_cpu_backends_include_torch_and_cpu():
    assert {"torch", "cpu"} <= set(_ON_CPU), f"uhc_fast.info() reports {_ON_CPU} usable on CPU tensors"


# ---------------------------------------------------------------------------------------- oracle self-checks
@FAST
@given(problems(families=CONSISTENT_FAMILIES, noises=(0.0,)))
def test_oracle_ce_recovers_consistent_teachers(problem):
    if has_exact_truth(problem, "probs"):
        assert_close(orc.oracle_ce(problem), problem.truth, 1e-12, "ce oracle vs truth")
    else:  # the eps clamp changed the problem: the oracle's own certificate is the check
        q = orc.oracle_ce(problem)
        assert (orc.ce_relative_kkt(problem, q) <= 1e-10).all()


def test_oracle_ce_tiny_bridges_to_full_precision():
    for q0 in (7.4e-6, 1e-10):
        problem = orc.tiny_bridge_regression(q0)
        assert_close(orc.oracle_ce(problem), problem.truth, 1e-14, f"ce oracle, tiny bridge q0={q0}")


@SLOWER
@given(problems(families=("random_subsets", "one_class", "extreme_weights", "two_class"), noises=(0.3,)))
def test_oracle_ce_agrees_with_scipy(problem):
    """The Newton oracle against scipy's trust-region Newton-CG on the same convex L(u)."""
    sets, probs, weights = orc.teacher_values(problem, kind="probs")
    expected = orc.oracle_ce(problem)
    for b in range(problem.batch):

        def objective(u, b=b):
            value, grad = 0.0, np.zeros_like(u)
            for s, p, w in zip(sets, probs, weights):
                x = u[s]
                top = x.max()
                e = np.exp(x - top)
                value += w * (np.log(e.sum()) + top - p[b] @ x)
                grad[s] += w * (e / e.sum() - p[b])
            return value, grad

        result = optimize.minimize(
            objective, np.zeros(problem.num_classes), jac=True, method="BFGS", options={"gtol": 1e-12}
        )
        u = result.x - result.x.max()
        q = np.exp(u) / np.exp(u).sum()
        assert np.abs(q - expected[b]).max() < 1e-6, (q, expected[b])


@FAST
@given(problems(families=CONSISTENT_FAMILIES, noises=(0.0,)))
def test_oracle_mf_lf_recovers_consistent_teachers(problem):
    if has_exact_truth(problem, "logits"):
        assert_close(orc.oracle_mf_lf(problem), problem.truth, 1e-10, "mf-lf oracle vs truth")
    else:
        q = orc.oracle_mf_lf(problem)
        assert np.isfinite(q).all() and np.allclose(q.sum(axis=1), 1)


@SLOWER
@given(problems(families=CONSISTENT_FAMILIES, noises=(0.0,), temperatures=(1.0,)))
def test_oracle_mf_p_recovers_consistent_teachers(problem):
    sets, probs, weights = orc.teacher_values(problem, kind="probs")
    for b in range(problem.batch):
        p, mask, w = orc.dense_row(sets, probs, weights, b, problem.num_classes)
        v = orc.mf_p_v_of_q(p, mask, problem.truth[b])
        assert orc.mf_p_objective(p, mask, w, problem.truth[b], v) < 1e-20
        # from the naive estimate's scales only, no hint of the truth
        q, _, f = orc.oracle_mf_p_row(p, mask, w, [orc.mf_p_v_of_q(p, mask, orc.oracle_sd(problem)[b])])
        assert f <= 1e-12 * w.sum() and np.abs(q - problem.truth[b]).max() < 1e-7, (f, q, problem.truth[b])


@SLOWER
@given(scaled_problems(noises=(0.0,)))
def test_oracle_mf_lu_recovers_consistent_teachers(problem):
    problem.scales = None  # start from v = 1 only
    assert_close(orc.oracle_mf_lu(problem), problem.truth, 1e-9, "mf-lu oracle vs truth")


def test_oracle_sd_by_hand():
    # two teachers over [0, 1] and [1, 2] with weights 1 and 3: q ~ (.2, .8 + 3 * .5, 3 * .5)
    problem = orc.Problem(
        sets=[[0, 1], [1, 2]],
        num_classes=3,
        outputs=[np.array([[0.2, 0.8]]), np.array([[0.5, 0.5]])],
        weights=np.array([1.0, 3.0]),
    )
    expected = np.array([0.2, 0.8 + 1.5, 1.5]) / 4.0
    np.testing.assert_allclose(orc.oracle_sd(problem)[0], expected, rtol=1e-15)


# ---------------------------------------------------------------------------------------- sd, ce, mf-lf
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FAST
@given(problem=problems())
def test_sd_matches_oracle(backend, dtype, problem):
    soft, info, seen = solve(problem, "sd", backend, dtype)
    assert_finite(soft, info, problem)
    assert_close(soft, orc.oracle_sd(problem, seen), SD_ACCURACY[dtype], f"sd/{backend}/{dtype}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FAST
@given(problem=problems())
def test_ce_matches_oracle(backend, dtype, problem):
    soft, info, seen = solve(problem, "ce", backend, dtype)
    assert_finite(soft, info, problem)
    assert_close(soft, orc.oracle_ce(problem, seen), ACCURACY[dtype], f"ce/{backend}/{dtype}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FAST
@given(problem=problems())
def test_mf_lf_matches_oracle(backend, dtype, problem):
    soft, info, seen = solve(problem, "mf-lf", backend, dtype)
    assert_finite(soft, info, problem)
    assert_close(soft, orc.oracle_mf_lf(problem, seen), ACCURACY[dtype], f"mf-lf/{backend}/{dtype}")


def family_problems(family: str) -> list[orc.Problem]:
    """Three fixed problems of ``family``: consistent probabilities, noisy weighted probabilities at a
    temperature, noisy logits."""
    seed = 1000 + orc.FAMILIES.index(family)
    return [
        orc.make_problem(family, seed, batch=6),
        orc.make_problem(family, seed + 1, batch=6, noise=0.3, weighted=True, temperature=2.5),
        orc.make_problem(family, seed + 2, batch=6, noise=0.3, inputs="logits", temperature=0.5),
    ]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["ce", "mf-lf"])
@pytest.mark.parametrize("family", orc.FAMILIES)
def test_family_matches_oracle(family, method, backend, dtype):
    """Each hard family on its own (so that a failure names it), at the issue's tolerances."""
    errors = []
    for problem in family_problems(family):
        soft, info, seen = solve(problem, method, backend, dtype)
        assert_finite(soft, info, problem)
        expected = orc.ORACLES[method](problem, seen)
        err = np.abs(soft - expected).max()
        if not err <= ACCURACY[dtype]:
            errors.append(f"{err:.3g} on {problem!r}")
    assert not errors, f"{method}/{backend}/{dtype} on {family}: max |q - oracle| > {ACCURACY[dtype]:g}: {errors}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["sd", "ce", "mf-lf"])
def test_low_precision_inputs_match_oracle(method, backend, dtype):
    """float16/bfloat16 inputs are computed in float32: the float32 tolerance against the oracle on
    the rounded inputs (well-conditioned families, masses not below float16's range)."""
    tol = (SD_ACCURACY if method == "sd" else ACCURACY)[dtype]
    for seed, family in enumerate(("random_subsets", "one_teacher", "extreme_weights", "two_class")):
        for inputs in ("probs", "logits"):
            problem = orc.make_problem(family, 77 + seed, batch=5, noise=0.3, inputs=inputs, sharpness=1.0)
            soft, info, seen = solve(problem, method, backend, dtype)
            assert_finite(soft, info, problem)
            assert_close(soft, orc.ORACLES[method](problem, seen), tol, f"{method}/{backend}/{dtype} {problem!r}")


# ---------------------------------------------------------------------------------------- converged rows
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ITERATIVE)
@SLOWER
@given(data=st.data())
def test_converged_rows_are_right(method, backend, dtype, data):
    """No row reported converged is further than 1e-3 from the oracle: the global optimum for ce, the
    local minimum reached by polishing the library's answer for mf-p and mf-lu (which must also not
    lower the objective by more than a small relative amount)."""
    if method == "mf-lu":
        problem = data.draw(scaled_problems(noises=(0.0, 0.1, 0.5)), label="problem")
    else:
        problem = data.draw(problems(), label="problem")
    soft, info, seen = solve(problem, method, backend, dtype)
    assert_finite(soft, info, problem)
    rows = np.flatnonzero(converged_rows(info))
    if method == "ce":
        err = np.abs(soft - orc.oracle_ce(problem, seen)).max(axis=1)
        bad = [f"row {b}: {err[b]:.3g}" for b in rows if not err[b] <= CONVERGED_ERROR]
    else:
        bad = local_minimum_failures(method, problem, soft, seen, rows, dtype)
    assert not bad, f"{method}/{backend}/{dtype}: rows reported converged but wrong: {bad}"


# ---------------------------------------------------------------------------------------- mf-p
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FAST
@given(problem=problems(families=CONSISTENT_FAMILIES, noises=(0.0,)))
def test_mf_p_exact_recovery(backend, dtype, problem):
    """Consistent teachers: the objective's zero is the generating q, and every solver must find it."""
    soft, info, _ = solve(problem, "mf-p", backend, dtype)
    assert_finite(soft, info, problem)
    if not has_exact_truth(problem, "probs"):  # the eps clamp at T != 1 made the teachers inconsistent
        return
    assert_close(soft, problem.truth, ACCURACY[dtype], f"mf-p/{backend}/{dtype} vs the generating q")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@FAST
@given(problem=problems(noises=(0.3, 1.0)))
def test_mf_p_backends_agree(dtype, problem):
    answers = {b: solve(problem, "mf-p", b, dtype) for b in CPU_BACKENDS}
    assert len(answers) >= 2, f"needs two CPU backends, have {list(answers)}"
    tol = 1e-6 if dtype == "float64" else CONVERGED_ERROR
    for first, second in itertools.combinations(answers, 2):
        (q1, i1, _), (q2, i2, _) = answers[first], answers[second]
        both = converged_rows(i1) & converged_rows(i2)
        err = np.abs(q1 - q2).max(axis=1)
        bad = both & ~(err <= tol)
        assert not bad.any(), (
            f"mf-p {first} vs {second} ({dtype}): {err[bad].max():.3g} > {tol:g} on rows {np.flatnonzero(bad)}"
        )


# ---------------------------------------------------------------------------------------- mf-lu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@FAST
@given(problem=scaled_problems(noises=(0.0,)))
def test_mf_lu_exact_recovery_at_different_temperatures(backend, dtype, problem):
    """``z_il = T (v_i log q_l + c_i)`` with ``v_i = 1 / T_i`` of weighted mean 1: the answer is q."""
    soft, info, _ = solve(problem, "mf-lu", backend, dtype)
    assert_finite(soft, info, problem)
    assert_close(soft, problem.truth, LU_RECOVERY[dtype], f"mf-lu/{backend}/{dtype} vs the generating q")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("num_classes", "num_teachers"), [(100, 5), (100, 20), (1000, 5), (1000, 20)])
def test_mf_lu_converges_on_noisy_random_subsets(num_classes, num_teachers, backend):
    batch = 100
    problem = orc.make_scaled_problem(
        num_classes * 31 + num_teachers,
        num_classes=num_classes,
        num_teachers=num_teachers,
        noise=0.3,
        batch=batch,
        spread=0.5,
    )
    soft, info, seen = solve(problem, "mf-lu", backend, "float64")
    assert_finite(soft, info, problem)
    converged = converged_rows(info)
    residual = np.asarray(torch.as_tensor(info["residual"]), dtype=np.float64)
    assert converged.mean() >= 0.99, (
        f"mf-lu/{backend} K={num_classes} N={num_teachers}: {converged.mean():.1%} of rows converged "
        f"(residuals up to {residual.max():.3g}, tol {info['tol']:g})"
    )
    # the oracle on the converged rows with the largest residuals
    rows = [b for b in np.argsort(-residual) if converged[b]][:3]
    failures = local_minimum_failures("mf-lu", problem, soft, seen, rows, "float64")
    assert not failures, failures


# ---------------------------------------------------------------------------------------- regressions
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_ce_tiny_bridge(backend, dtype):
    """sets=[[0,3,2],[1,0]], q=[7.4e-6, .8249, 4.5e-4, rest]: class 0 is the only link."""
    problem = orc.tiny_bridge_regression(7.4e-6)
    soft, info, seen = solve(problem, "ce", backend, dtype)
    assert_finite(soft, info, problem)
    assert_close(soft, problem.truth, ACCURACY[dtype], f"ce/{backend}/{dtype} vs the generating q")
    assert_close(soft, orc.oracle_ce(problem, seen), ACCURACY[dtype], f"ce/{backend}/{dtype} vs the oracle")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_ce_tiny_bridge_1e10(backend):
    problem = orc.tiny_bridge_regression(1e-10)
    soft, info, _ = solve(problem, "ce", backend, "float64")
    assert_finite(soft, info, problem)
    assert_close(soft, problem.truth, ACCURACY["float64"], f"ce/{backend} (q0 = 1e-10) vs the generating q")


def one_teacher_logits() -> orc.Problem:
    z = torch.randn(4, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 8
    return orc.Problem(
        sets=[list(range(13))],
        num_classes=13,
        outputs=[z.numpy()],
        inputs="logits",
        weights=np.array([4.986328685367134]),
        family="regression/one_teacher_logits",
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_mf_lf_one_teacher_13_classes(backend, dtype):
    """One teacher, z = randn(4, 13) * 8, weight 4.986...: the answer is softmax(z)."""
    problem = one_teacher_logits()
    soft, info, seen = solve(problem, "mf-lf", backend, dtype)
    assert_finite(soft, info, problem)
    expected = torch.softmax(torch.from_numpy(seen[0]), dim=1).numpy()
    assert_close(soft, expected, ACCURACY[dtype], f"mf-lf/{backend}/{dtype} vs softmax(z)")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("heavy", [0, 2, 4])
def test_regression_mf_lf_one_dominant_teacher(backend, heavy):
    """Consistent logits (each teacher's fit exact), one teacher weighted 1e12 and the others
    between 1e-12 and 1: the answer is the truth whatever the weights. With the last teacher
    grounded, the dominant one's shift was solved from a difference of its own logits and the means
    it dominates, which lost 1e-16 times the weight ratio (0.85 at 1e12 / 1e-12)."""
    rng = np.random.default_rng(7 + heavy)
    sets = [[0, 1, 2], [2, 3], [3, 4, 5, 0], [5, 6], [6, 7, 1]]
    truth = rng.dirichlet(np.ones(8), size=4)
    outputs = [np.log(truth[:, s]) + 3 * rng.standard_normal((4, 1)) for s in sets]
    weights = np.array([1.0, 1e-12, 1e-6, 1e-9, 1e-3])
    weights[heavy] = 1e12
    problem = orc.Problem(sets=sets, num_classes=8, outputs=outputs, inputs="logits", truth=truth, weights=weights)
    soft, info, _ = solve(problem, "mf-lf", backend, "float64")
    assert_finite(soft, info, problem)
    assert_close(soft, truth, 1e-12, f"mf-lf/{backend} with teacher {heavy} dominant vs truth")


def consistent_probs_problem(sets, num_classes, weights, seed, batch=8) -> orc.Problem:
    """Teachers' probabilities of one Dirichlet truth per row: every method's answer is the truth,
    whatever the weights."""
    truth = np.random.default_rng(seed).dirichlet(np.ones(num_classes), size=batch)
    outputs = [truth[:, s] / truth[:, s].sum(axis=1, keepdims=True) for s in sets]
    return orc.Problem(sets=sets, num_classes=num_classes, outputs=outputs, truth=truth, weights=np.array(weights))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("sets", "weights"),
    [
        ([[0, 1], [1, 2]], [1.0, 1e-12]),
        ([[1, 2], [0, 1]], [1e-12, 1.0]),
        ([[0, 1, 2], [1, 2, 3], [3, 4, 0]], [1e-6, 1e8, 1e-4]),
        ([[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 0]], [1e12, 1e-12, 1e-12]),
    ],
)
@pytest.mark.parametrize("method", ["ce", "mf-p"])
def test_regression_extreme_weights_recover_consistent_teachers(method, sets, weights, backend):
    """Weight ratios up to 1e24 on consistent teachers: converged, at the truth. With the last
    teacher grounded whatever its weight, `ce` never converged beyond a ratio of about 1e8 (the
    heavy teacher's gradient is a small difference of the terms it dominates), and `mf-p`, which
    starts from `ce`, returned NaN rows on the compiled CPU backend."""
    problem = consistent_probs_problem(sets, max(max(s) for s in sets) + 1, weights, seed=len(sets))
    soft, info, _ = solve(problem, method, backend, "float64")
    assert_finite(soft, info, problem)
    assert bool(info["converged"].all()), info["residual"]
    assert_close(soft, problem.truth, 1e-9, f"{method}/{backend} with weights {weights} vs truth")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_ce_grounds_the_teacher_with_most_shared_evidence(backend):
    """Two cases where the grounded teacher decides whether `ce` converges, and to what.

    Confident consistent teachers (q = softmax(20 g)) over [[0, 1, 2], [1, 3], [2, 3, 4]]: the last
    teacher is joined to the others only through classes of mass 1e-17 and less; grounded, its
    gradient (the only one that sees those classes at full precision) went unused, and rows were
    reported converged up to 2e-3 off. A tiny bridge with one heavy teacher (hypothesis found it):
    grounding the heaviest teacher left the same split to the noise of the other two (3.5e-6 off,
    reported converged). The rule: ground the teacher with the most evidence on shared classes."""
    rng = np.random.default_rng(0)
    truth = np.exp(20 * rng.standard_normal((200, 5)))
    truth /= truth.sum(axis=1, keepdims=True)
    sets = [[0, 1, 2], [1, 3], [2, 3, 4]]
    outputs = [truth[:, s] / truth[:, s].sum(axis=1, keepdims=True) for s in sets]
    problem = orc.Problem(sets=sets, num_classes=5, outputs=outputs, truth=truth)
    soft, info, _ = solve(problem, "ce", backend, "float64")
    converged = np.asarray(info["converged"])
    assert converged.mean() > 0.95
    assert_close(soft[converged], truth[converged], 1e-7, f"ce/{backend}: converged rows vs truth")

    bridge = orc.Problem(
        sets=[[0, 2, 3, 1], [6, 4, 0, 5], [3, 0, 2, 1]],
        num_classes=7,
        outputs=[
            np.array([[-51.75771586, -7.39535879, -12.49393395, 1.20864392]]),
            np.array([[-14.63920099, -19.53603459, -56.75590319, -7.60362427]]),
            np.array([[0.76636117, -38.49742073, 5.86493633, 14.46893904]]),
        ],
        inputs="logits",
        weights=np.array([0.81843922, 45.76804503, 0.49315369]),
        temperature=2.5,
    )
    soft, info, seen = solve(bridge, "ce", backend, "float64")
    assert bool(info["converged"].all())
    assert_close(soft, orc.oracle_ce(bridge, seen), 1e-7, f"ce/{backend}: tiny bridge beside a heavy teacher")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_ce_tiny_bridges_carry_the_split(backend):
    """Two blocks of classes ({0} and {4}, each held by two teachers with p = 1 to float64's
    resolution) joined only through classes of mass 1e-50 to 1e-68: the split between the blocks
    (1 : 6.68e-7) is in those classes' terms alone. At the start every class's KKT condition holds
    to rounding, so only the Newton step can see the error. The compiled CPU backend summed each
    teacher's terms before subtracting: its gradient was exactly 0, and it reported converged at
    0.5 : 0.5.

    Confident teachers over [[0, 1, 2], [1, 3], [2, 3, 4]] (q = softmax(20 g)), joined through
    classes of mass 1e-17 and less: the compiled CPU backend carried D_g from step to step as
    D_g + sum_i r_i expm1(step_i); while a group's heavy teacher's r fell, step after step, the
    rounding stayed and D_g drifted, and a fifth of the rows stalled (reported not converged) where
    the reference converged on all (the first case of
    test_regression_ce_grounds_the_teacher_with_most_shared_evidence)."""
    truth = np.array([[1.0, 9.25e-50, 5.57e-68, 1.76e-52, 6.68e-7]])
    truth /= truth.sum()
    sets = [[1, 2, 4], [0, 1, 3], [2, 3, 4], [0, 2, 3]]
    outputs = [truth[:, s] / truth[:, s].sum(axis=1, keepdims=True) for s in sets]
    problem = orc.Problem(sets=sets, num_classes=5, outputs=outputs, truth=truth)
    soft, info, _ = solve(problem, "ce", backend, "float64")
    assert bool(info["converged"].all())
    assert_close(soft, truth, 1e-9, f"ce/{backend}: split across a tiny bridge")
    assert np.allclose(soft[0, 1:4] / truth[0, 1:4], 1, rtol=1e-6), soft[0, 1:4] / truth[0, 1:4]


@pytest.mark.parametrize("s", [20, 40])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_ce_flows_carry_the_split_between_blocks(backend, s):
    """Confident consistent teachers (q = softmax(s g)) over random sets of 12 classes, two of them
    identical: blocks of teachers joined to the rest only through classes of mass 1e-20 and less.
    The step along the split was the sum of the block's gradients, whose large terms cancel and
    whose rounding (1e-26) swamped the joining classes' terms (1e-28): the torch reference reported
    13 rows in 1600 converged up to 3e-2 off, the compiled CPU backend 7 up to 0.5 off (s = 20).
    With the gradient as flows every converged row is right, and all but a few converge (the truth
    is the optimum of these inputs: a 400-digit solve agrees with it to 1e-16)."""
    rng = np.random.default_rng(0)
    sets = [[1, 3, 5, 7, 9], [0, 3, 6, 8, 10, 11], [1, 3, 5, 7, 9], [0, 1, 2, 3, 4, 8], [0, 8, 11]]
    truth = np.exp(s * rng.standard_normal((400, 12)))
    truth /= truth.sum(axis=1, keepdims=True)
    outputs = [truth[:, c] / truth[:, c].sum(axis=1, keepdims=True) for c in sets]
    problem = orc.Problem(sets=sets, num_classes=12, outputs=outputs, truth=truth)
    soft, info, _ = solve(problem, "ce", backend, "float64")
    converged = np.asarray(info["converged"])
    assert converged.mean() >= (0.99 if s == 20 else 0.95)
    assert_close(soft[converged], truth[converged], 1e-7, f"ce/{backend}: converged rows vs truth")


@pytest.mark.parametrize("tol", [1e-2, 1e-3])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ce_converged_rows_are_within_a_loose_tol_of_the_optimum(backend, tol):
    """At a loose tol the compiled `ce` lets the summed gradient's rounding move its step by up to
    tol / 32 before it forms the flows: on confident consistent teachers joined through classes of
    tiny mass (q = softmax(20 g), the blocks' family), every row it reports converged must still be
    within tol of the optimum (the truth), as the reference's."""
    rng = np.random.default_rng(0)
    sets = [[1, 3, 5, 7, 9], [0, 3, 6, 8, 10, 11], [1, 3, 5, 7, 9], [0, 1, 2, 3, 4, 8], [0, 8, 11]]
    truth = np.exp(20 * rng.standard_normal((400, 12)))
    truth /= truth.sum(axis=1, keepdims=True)
    outputs = [truth[:, c] / truth[:, c].sum(axis=1, keepdims=True) for c in sets]
    problem = orc.Problem(sets=sets, num_classes=12, outputs=outputs, truth=truth)
    soft, info, _ = solve(problem, "ce", backend, "float64", tol=tol)
    converged = converged_rows(info)
    assert converged.mean() >= 0.99
    assert_close(soft[converged], truth[converged], tol, f"ce/{backend}: converged rows at tol={tol:g}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_ce_float32_inputs_keep_the_links_below_float32_range(backend):
    """Float32 inputs of confident consistent teachers (q = softmax(20 g) over random sets of 12
    classes, weights spanning e^-2..e^2): blocks of teachers joined only through classes of mass
    1e-39 and less. The Newton system, assembled in float32 for float32 answers, lost those links
    (they underflowed), the split between the blocks was never corrected, and rows were reported
    converged 0.03 to 1.0 off: the compiled CPU backend 7 of these 400, the torch reference 8. With
    the system in float64 every row converges to the truth, to float32's precision."""
    sets = [[4, 7, 9], [3, 4, 5, 6], [0, 4], [1, 3, 7, 8, 11], [4, 5, 6, 8, 9, 11], [0, 3, 4, 10, 11], [0, 2]]
    weights = np.exp(np.random.default_rng(1).uniform(-2, 2, len(sets)))
    truth = np.exp(20 * np.random.default_rng(1).standard_normal((400, 12)))
    truth /= truth.sum(axis=1, keepdims=True)
    outputs = [truth[:, c] / truth[:, c].sum(axis=1, keepdims=True) for c in sets]
    problem = orc.Problem(sets=sets, num_classes=12, outputs=outputs, weights=weights, truth=truth)
    soft, info, _ = solve(problem, "ce", backend, "float32")
    converged = converged_rows(info)
    assert converged.all(), f"ce/{backend}: rows {np.flatnonzero(~converged).tolist()} not converged"
    assert_close(soft, truth, 1e-5, f"ce/{backend}: float32 rows vs truth")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_ce_converged_only_once_newton_steps_are_short(backend, dtype):
    """Classes 1 (0.30) and 4 (0.70), each held by one teacher with p = 1, split only through
    classes of mass 1e-12 and less (a row of q = softmax(10 g) over random sets of 12 classes).
    In float32 both backends stopped after 12 steps at q_4 = 2.6e-5, reported converged: its
    teacher's t was stepping by about 1 at a time, and the step's first-order change of the soft
    labels (q_4 times that) and the relative residual both passed tol. Now a row converges only
    once its Newton step is at most CONVERGED_LOG_STEP in every t_i."""
    truth = np.array([[1.007e-15, 0.2977, 1.479e-11, 3.982e-13, 0.7023, 5.802e-13, 1.369e-16, 2.528e-11, 4.136e-17,
                       1.43e-18, 1.705e-7, 4.172e-14]])  # fmt: skip
    truth /= truth.sum()
    sets = [[0, 3, 5, 8, 9, 11], [0, 7, 9, 10], [2, 3, 6, 7, 11], [1, 3, 5, 8, 10, 11], [4, 5, 8, 9], [7, 8, 9, 10]]
    outputs = [truth[:, s] / truth[:, s].sum(axis=1, keepdims=True) for s in sets]
    problem = orc.Problem(sets=sets, num_classes=12, outputs=outputs, truth=truth)
    soft, info, seen = solve(problem, "ce", backend, dtype)
    assert bool(info["converged"].all())
    assert_close(soft, orc.oracle_ce(problem, seen), ACCURACY[dtype], f"ce/{backend}/{dtype} vs the oracle")


def two_scales_problem() -> orc.Problem:
    q = np.array([0.052, 0.0167, 0.0153, 0.266, 0.5522, 0.0978])
    sets = [[0, 1, 2, 3, 4], [3, 4, 5]]
    scales = (1.7, 0.3)
    outputs = [(v * np.log(q[s]))[None, :] for v, s in zip(scales, sets)]
    return orc.Problem(
        sets=sets,
        num_classes=6,
        outputs=outputs,
        inputs="logits",
        truth=q[None, :],
        scales=np.array([scales]),
        family="regression/two_scales",
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_mf_lu_two_scales(backend, dtype):
    """q=[.052,.0167,.0153,.266,.5522,.0978], sets [[0..4],[3,4,5]], z_i = v_i log q, v = (1.7, 0.3)."""
    problem = two_scales_problem()
    soft, info, _ = solve(problem, "mf-lu", backend, dtype)
    assert_finite(soft, info, problem)  # residuals included
    assert_close(soft, problem.truth, LU_RECOVERY[dtype], f"mf-lu/{backend}/{dtype} vs q")
    assert_close(orc.oracle_mf_lu(problem), problem.truth, 1e-9, "mf-lu oracle vs q")


_WORKLOAD: dict = {}


def workload_answers() -> tuple[orc.Problem, dict]:
    """``benchmarks.workloads.make(4854, 10, 10, dtype=torch.float32)`` (re-created) through mf-p on
    every CPU backend, computed once."""
    if not _WORKLOAD:
        problem = orc.benchmark_workload(4854, 10, 10)
        _WORKLOAD["problem"] = problem
        _WORKLOAD["answers"] = {b: solve(problem, "mf-p", b, "float32") for b in CPU_BACKENDS}
    return _WORKLOAD["problem"], _WORKLOAD["answers"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_regression_mf_p_workload_converged_rows_are_local_minima(backend):
    problem, answers = workload_answers()
    soft, info, seen = answers[backend]
    assert_finite(soft, info, problem)
    converged = converged_rows(info)
    residual = np.asarray(torch.as_tensor(info["residual"]), dtype=np.float64)
    # the oracle on 120 converged rows: the largest residuals, the largest disagreement between
    # backends, and a fixed random sample
    spread = np.max([np.abs(a[0] - soft).max(axis=1) for a in answers.values()], axis=0)
    candidates = np.flatnonzero(converged)
    picked = [
        *candidates[np.argsort(-residual[candidates])][:40],
        *candidates[np.argsort(-spread[candidates])][:40],
        *np.random.default_rng(0).choice(candidates, size=min(40, candidates.size), replace=False),
    ]
    rows = sorted(set(int(b) for b in picked))
    failures = local_minimum_failures("mf-p", problem, soft, seen, rows, "float32")
    assert not failures, f"mf-p/{backend}: {len(failures)} of {len(rows)} checked converged rows: {failures[:8]}"


def test_regression_mf_p_workload_backends_agree():
    _, answers = workload_answers()
    assert len(answers) >= 2, f"needs two CPU backends, have {list(answers)}"
    for first, second in itertools.combinations(answers, 2):
        (q1, i1, _), (q2, i2, _) = answers[first], answers[second]
        both = converged_rows(i1) & converged_rows(i2)
        err = np.abs(q1 - q2).max(axis=1)
        bad = np.flatnonzero(both & ~(err <= CONVERGED_ERROR))
        assert bad.size == 0, (
            f"mf-p {first} vs {second}: {bad.size} of {both.sum()} rows converged on both differ by up to "
            f"{err[both].max():.3g} (rows {bad[:10].tolist()})"
        )


# ---------------------------------------------------------------------------------------- arguments, prior
@pytest.mark.parametrize("eps", [0.0, float("nan"), -1e-3, 1.0, 2.5])
@pytest.mark.parametrize("method", ["mf-lf", "mf-lu"])
def test_invalid_eps_is_refused(method, eps):
    problem = orc.make_problem("random_subsets", 5, batch=2, noise=0.3)
    tensors = [torch.from_numpy(x) for x in problem.outputs]
    with pytest.raises(ValueError, match="eps"):
        uhc_fast.estimate(tensors, problem.sets, method, inputs="probs", eps=eps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["sd", "ce", "mf-lf"])
def test_disconnected_default_prior(method, backend):
    """Without alpha a disconnected overlap graph warns and gets the uniform prior with alpha = 0.01."""
    problem = orc.make_problem("disconnected", 11, batch=4, noise=0.3)
    problem.alpha = None
    tol = (SD_ACCURACY if method == "sd" else ACCURACY)["float64"]
    with pytest.warns(uhc_fast.DisconnectedClassesWarning):
        soft, info, seen = solve(problem, method, backend, "float64")
    assert_finite(soft, info, problem)
    assert_close(soft, orc.ORACLES[method](problem, seen), tol, f"{method}/{backend} with the default prior")


# ---------------------------------------------------------------------------------------- triton (interpreter)
def tiny_problems() -> list[orc.Problem]:
    """Small problems of every family, small enough for the Triton interpreter."""
    out = []
    for j, family in enumerate(orc.FAMILIES):
        out.append(orc.make_problem(family, 500 + j, batch=2, noise=0.3 * (j % 2), max_classes=6, max_teachers=3))
    out.append(orc.tiny_bridge_regression(7.4e-6))
    out.append(orc.tiny_bridge_regression(1e-10))
    return out


needs_triton_on_cpu = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton is not usable on CPU tensors here")


@pytest.mark.interpret
@needs_triton_on_cpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", ["sd", "ce", "mf-lf"])
def test_triton_interpreter_matches_oracle(method, dtype):
    tol = (SD_ACCURACY if method == "sd" else ACCURACY)[dtype]
    errors = []
    for problem in tiny_problems():
        soft, info, seen = solve(problem, method, "triton", dtype)
        assert_finite(soft, info, problem)
        err = np.abs(soft - orc.ORACLES[method](problem, seen)).max()
        if not err <= tol:
            errors.append(f"{err:.3g} on {problem!r}")
    assert not errors, f"{method}/triton/{dtype}: {errors}"


@pytest.mark.interpret
@needs_triton_on_cpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", ITERATIVE)
def test_triton_interpreter_converged_rows_are_right(method, dtype):
    if method == "mf-lu":
        cases = [
            orc.make_scaled_problem(600 + j, batch=2, noise=0.1 * j, max_classes=6, max_teachers=3) for j in range(4)
        ]
        cases.append(two_scales_problem())
    else:
        cases = tiny_problems()
    bad = []
    for problem in cases:
        soft, info, seen = solve(problem, method, "triton", dtype)
        assert_finite(soft, info, problem)
        rows = np.flatnonzero(converged_rows(info))
        if method == "ce":
            err = np.abs(soft - orc.oracle_ce(problem, seen)).max(axis=1)
            bad += [f"row {b}: {err[b]:.3g} on {problem!r}" for b in rows if not err[b] <= CONVERGED_ERROR]
        else:
            bad += [f"{f} on {problem!r}" for f in local_minimum_failures(method, problem, soft, seen, rows, dtype)]
    assert not bad, f"{method}/triton/{dtype}: {bad}"


@pytest.mark.interpret
@needs_triton_on_cpu
def test_triton_interpreter_regressions():
    failures = []
    for dtype in ("float64", "float32"):
        problem = orc.tiny_bridge_regression(7.4e-6)
        soft, _, _ = solve(problem, "ce", "triton", dtype)
        if not np.abs(soft - problem.truth).max() <= ACCURACY[dtype]:
            failures.append(f"ce tiny bridge {dtype}: {np.abs(soft - problem.truth).max():.3g}")
        problem = one_teacher_logits()
        soft, _, seen = solve(problem, "mf-lf", "triton", dtype)
        expected = torch.softmax(torch.from_numpy(seen[0]), dim=1).numpy()
        if not np.abs(soft - expected).max() <= ACCURACY[dtype]:
            failures.append(f"mf-lf one teacher {dtype}: {np.abs(soft - expected).max():.3g}")
        problem = two_scales_problem()
        soft, info, _ = solve(problem, "mf-lu", "triton", dtype)
        residual = np.asarray(torch.as_tensor(info["residual"]), dtype=np.float64)
        if not (np.abs(soft - problem.truth).max() <= LU_RECOVERY[dtype] and np.isfinite(residual).all()):
            failures.append(f"mf-lu two scales {dtype}: {np.abs(soft - problem.truth).max():.3g}, residual {residual}")
    problem = orc.tiny_bridge_regression(1e-10)
    soft, _, _ = solve(problem, "ce", "triton", "float64")
    if not np.abs(soft - problem.truth).max() <= ACCURACY["float64"]:
        failures.append(f"ce tiny bridge q0=1e-10: {np.abs(soft - problem.truth).max():.3g}")
    # extreme weights (test_regression_extreme_weights_recover_consistent_teachers): the gauges
    for sets, weights in (([[1, 2], [0, 1]], [1e-12, 1.0]), ([[0, 1, 2], [1, 2, 3], [3, 4, 0]], [1e-6, 1e8, 1e-4])):
        problem = consistent_probs_problem(sets, max(max(s) for s in sets) + 1, weights, seed=len(sets), batch=2)
        for method in ("ce", "mf-p"):
            soft, info, _ = solve(problem, method, "triton", "float64")
            error = np.abs(soft - problem.truth).max()
            if not (error <= 1e-9 and bool(info["converged"].all())):
                failures.append(f"{method} weights {weights}: {error:.3g}, converged {info['converged'].tolist()}")
    assert not failures, failures


# ---------------------------------------------------------------------------------------- GPU
def gpu_problems() -> list[orc.Problem]:
    out = [orc.make_problem(f, 900 + j, batch=16, noise=0.3 * (j % 2)) for j, f in enumerate(orc.FAMILIES)]
    out.append(orc.tiny_bridge_regression(7.4e-6))
    out.append(orc.tiny_bridge_regression(1e-10))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", ["sd", "ce", "mf-lf"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_matches_oracle(backend, method, dtype):
    require_gpu_backend(backend)
    tol = (SD_ACCURACY if method == "sd" else ACCURACY)[dtype]
    errors = []
    for problem in gpu_problems():
        soft, info, seen = solve(problem, method, backend, dtype, device="cuda")
        assert_finite(soft, info, problem)
        err = np.abs(soft - orc.ORACLES[method](problem, seen)).max()
        if not err <= tol:
            errors.append(f"{err:.3g} on {problem!r}")
    assert not errors, f"{method}/{backend}/{dtype} on CUDA: {errors}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", ITERATIVE)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_converged_rows_are_right(backend, method, dtype):
    require_gpu_backend(backend)
    if method == "mf-lu":
        cases = [orc.make_scaled_problem(700 + j, batch=8, noise=0.1 * j) for j in range(4)]
        cases.append(two_scales_problem())
    else:
        cases = gpu_problems()
    bad = []
    for problem in cases:
        soft, info, seen = solve(problem, method, backend, dtype, device="cuda")
        assert_finite(soft, info, problem)
        rows = np.flatnonzero(converged_rows(info))
        if method == "ce":
            err = np.abs(soft - orc.oracle_ce(problem, seen)).max(axis=1)
            bad += [f"row {b}: {err[b]:.3g} on {problem!r}" for b in rows if not err[b] <= CONVERGED_ERROR]
        else:
            bad += [f"{f} on {problem!r}" for f in local_minimum_failures(method, problem, soft, seen, rows, dtype)]
    assert not bad, f"{method}/{backend}/{dtype} on CUDA: {bad}"
