"""The torch reference (``backend="torch"``) against float64 mathematics and independent formulations.

Its agreement with the independent oracles is ``test_oracles.py``'s job and every other backend's
agreement with it ``test_backends.py``'s; here are the properties that define it: exact recovery from
consistent teachers, invariances, the convergence tests each method reports (relative KKT residual,
predicted Newton correction), Newton's few steps against MM, and the closed forms against their
full least-squares problems.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import uhc_fast
from uhc_fast.constants import DEFAULT_MAX_ITER
from uhc_fast.inputs import convert, pack
from uhc_fast.methods import NAMES
from uhc_fast.options import Options
from uhc_fast.problem import TeacherSet

from .problems import consistent_outputs, make, max_diff, noisy, random_soft_labels, tolerance

RECOVERING = ("ce", "mf-p", "mf-lf")


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """These tests define correct: they run the torch reference whatever else is built."""
    monkeypatch.setenv("UHC_FAST_BACKEND", "torch")


def evidence_and_mask(outputs, sets, num_classes, weights=None):
    """``n_l = sum_{i covers l} w_i p_il`` ``(B, K)``, the ``(N, K)`` mask and the weights, in float64."""
    w = torch.ones(len(sets), dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    n = torch.zeros(outputs[0].shape[0], num_classes, dtype=torch.float64)
    mask = torch.zeros(len(sets), num_classes, dtype=torch.float64)
    for i, (cs, p) in enumerate(zip(sets, outputs)):
        n[:, cs] += w[i] * p.double()
        mask[i, cs] = 1
    return n, mask, w


def ce_residuals(q, n, mask, w):
    """The relative KKT residual ``max_l |q_l sum_{i covers l} w_i / S_i(q) / n_l - 1|`` and the
    absolute one ``max_l |q_l sum w_i / S_i - n_l| / sum w``, per row."""
    kkt = q * ((w / (q @ mask.T)) @ mask)
    relative = torch.where(n > 0, (kkt / n - 1).abs(), 0).amax(dim=1)
    absolute = (kkt - n).abs().amax(dim=1) / w.sum()
    return relative, absolute


# ---------------------------------------------------------------------------------------- exact recovery
@pytest.mark.parametrize("method", RECOVERING)
@pytest.mark.parametrize("kind", ["probs", "logits"])
@pytest.mark.parametrize(("seed", "sets"), [(0, "subsets"), (1, "windows"), (2, "subsets")])
def test_exact_recovery_from_consistent_teachers(method, kind, seed, sets):
    problem = make(seed, batch=12, classes=17 + seed, teachers=5 + seed, sets=sets, inputs=kind, weights=seed == 2)
    soft, _ = problem.estimate(method)
    assert soft.dtype == torch.float64
    torch.testing.assert_close(soft, problem.truth, atol=tolerance(method, torch.float64, "recovery"), rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_mf_lu_recovers_teachers_at_different_temperatures(seed):
    # the overall scale is not identifiable: scales of weighted mean 1 (what mf-lu reports at)
    scales = [0.5, 1.5, 0.8, 1.2, 0.7, 1.3]
    problem = make(seed, batch=24, classes=19, teachers=6, inputs="logits", scales=scales, link=3, coverage=0.5)
    soft, info = problem.estimate("mf-lu")
    torch.testing.assert_close(soft, problem.truth, atol=tolerance("mf-lu", torch.float64, "recovery"), rtol=0)
    assert bool(info["converged"].all())
    # the fixed-scale method cannot absorb the temperatures
    assert max_diff(problem.estimate("mf-lf")[0], problem.truth) > 1e-2


def test_sd_is_biased_towards_classes_many_teachers_cover():
    # class 0 is covered by all three teachers, every other class by one; truth is uniform
    sets = [[0, 1, 2], [0, 3, 4], [0, 5, 6]]
    q = torch.full((4, 7), 1 / 7, dtype=torch.float64)
    outputs = consistent_outputs(q, sets)
    sd = uhc_fast.estimate(outputs, sets, "sd")
    ce = uhc_fast.estimate(outputs, sets, "ce")
    assert bool((sd[:, 0] > 2 * sd[:, 1]).all())
    torch.testing.assert_close(ce, q, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------- ce
def test_ce_reaches_tolerance_in_few_newton_steps_on_inconsistent_teachers():
    problem = make(3, batch=200, classes=40, teachers=10, noise=0.5)
    soft, info = problem.estimate("ce")
    assert info["tol"] == 1e-9
    assert bool(info["converged"].all())
    assert bool((info["residual"] <= info["tol"]).all()) and bool((info["step"] <= info["tol"]).all())
    # Newton: a handful of steps where MM needs hundreds (see test_ce_matches_an_independent_mm_solver)
    assert int(info["iterations"].max()) <= 15
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(200, dtype=torch.float64))


def test_ce_reports_the_relative_and_the_absolute_kkt_residual():
    problem = make(4, batch=30, classes=15, teachers=5, noise=0.4, weights=True)
    n, mask, w = evidence_and_mask(problem.outputs, problem.sets, problem.num_classes, problem.weights)
    for tol in (1e-3, 1e-6, 1e-10):
        soft, info = problem.estimate("ce", tol=tol)
        relative, absolute = ce_residuals(soft, n, mask, w)
        assert bool(info["converged"].all())
        # the reported residuals are those of the last iterate, before its last (tiny) step
        assert bool((info["residual"] <= tol).all()) and bool((info["abs_residual"] <= info["residual"]).all())
        assert bool((relative <= tol).all()) and bool((absolute <= relative).all())
    # with no step allowed: the start point (one MM update of sd's estimate) and its residuals
    start, info = problem.estimate("ce", max_iter=0)
    assert int(info["iterations"].max()) == 0 and not bool(info["converged"].any())
    sd, _ = problem.estimate("sd")
    mm = n / ((w / (sd @ mask.T)) @ mask)
    mm = mm / mm.sum(dim=1, keepdim=True)
    torch.testing.assert_close(start, mm, atol=1e-14, rtol=0)
    relative, absolute = ce_residuals(mm, n, mask, w)
    torch.testing.assert_close(info["residual"], relative, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(info["abs_residual"], absolute, rtol=1e-9, atol=1e-15)


def test_ce_convergence_needs_the_newton_correction_too():
    """Two teachers joined only through a class of mass 7.4e-6: at the start point every class
    meets its KKT condition to 2e-5 (relative) and 1e-5 (absolute) while the answer is off by 0.32.
    The predicted Newton correction sees it; ``converged`` needs both."""
    q = torch.tensor([7.4e-6, 0.8249, 4.5e-4, 0.0], dtype=torch.float64)
    q[3] = 1 - q.sum()
    sets = [[0, 3, 2], [1, 0]]
    outputs = [(q[s] / q[s].sum())[None] for s in sets]
    soft, info = uhc_fast.estimate(outputs, sets, "ce", tol=1e-4, max_iter=0, return_info=True)
    error = max_diff(soft, q[None])
    assert error > 0.3
    assert float(info["residual"]) <= 1e-4 and float(info["abs_residual"]) <= 1e-4
    assert float(info["step"]) > 0.3 and not bool(info["converged"])
    soft, info = uhc_fast.estimate(outputs, sets, "ce", return_info=True)
    assert bool(info["converged"]) and max_diff(soft, q[None]) <= 1e-12


def test_ce_matches_an_independent_mm_solver():
    """Zermelo/Hunter MM iterations in float64, run to a relative KKT residual of 1e-12, reach the
    same optimum; Newton needs a handful of steps where MM needs hundreds."""
    problem = make(4, batch=8, classes=15, teachers=5, noise=0.4, weights=[1.0, 2.0, 0.5, 1.5, 1.0])
    n, mask, w = evidence_and_mask(problem.outputs, problem.sets, problem.num_classes, problem.weights)
    mm = n / n.sum(dim=1, keepdim=True)
    sweeps = 0
    while float(ce_residuals(mm, n, mask, w)[0].max()) > 1e-12 and sweeps < 20000:
        mm = n / ((w / (mm @ mask.T)) @ mask)
        mm = mm / mm.sum(dim=1, keepdim=True)
        sweeps += 1
    assert sweeps > 50  # the slow baseline that Newton replaces
    soft, info = problem.estimate("ce")
    assert int(info["iterations"].max()) <= 10
    torch.testing.assert_close(soft, mm, atol=1e-10, rtol=0)


def test_ce_matches_scipy_on_the_primal_objective():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    problem = make(5, batch=3, classes=9, teachers=4, noise=0.6)
    soft, _ = problem.estimate("ce")
    for b in range(3):

        def objective(u, b=b):
            total = 0.0
            for cs, p in zip(problem.sets, problem.outputs):
                sub = u[cs]
                lse = np.log(np.exp(sub - sub.max()).sum()) + sub.max()
                total += lse - float(p[b].numpy() @ sub)
            return total

        res = scipy_optimize.minimize(objective, np.zeros(9), method="BFGS", options={"gtol": 1e-10})
        expected = np.exp(res.x - res.x.max())
        np.testing.assert_allclose(soft[b].numpy(), expected / expected.sum(), atol=1e-5)


# ---------------------------------------------------------------------------------------- mf-lf
def test_mf_lf_matches_the_full_design_least_squares():
    problem = make(6, batch=20, classes=13, teachers=5, inputs="logits", noise=0.3, weights=[1.0, 2.0, 0.5, 1.5, 1.0])
    soft, _ = problem.estimate("mf-lf")
    # rows: one per (teacher, class) entry; columns: u (K) then c (N)
    rows = [(i, k) for i, cs in enumerate(problem.sets) for k in cs]
    design = np.zeros((len(rows), 13 + 5))
    for r, (i, k) in enumerate(rows):
        design[r, k] = design[r, 13 + i] = 1
    sqrt_w = np.sqrt([problem.weights[i] for i, _ in rows])
    z = torch.cat(problem.outputs, dim=1).numpy()
    solution = np.linalg.lstsq(design * sqrt_w[:, None], (z * sqrt_w).T, rcond=None)[0].T
    u = solution[:, :13]
    expected = np.exp(u - u.max(axis=1, keepdims=True))
    np.testing.assert_allclose(soft.numpy(), expected / expected.sum(axis=1, keepdims=True), atol=1e-10)


def test_mf_lf_with_extreme_weights_keeps_its_precision():
    """The eliminated system is solved grounded, by positive elimination: weights spanning 1e-8..1e4
    cost no accuracy (consistent teachers: the answer is exact)."""
    problem = make(7, batch=10, classes=12, teachers=5, inputs="logits", weights=[1e-8, 1e4, 1.0, 3e-5, 10.0])
    soft, _ = problem.estimate("mf-lf")
    torch.testing.assert_close(soft, problem.truth, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------- mf-p, mf-lu
def _mf_p_gradient(outputs, sets, soft):
    """Gradient in q of the mf-p objective at v = v(q) (envelope theorem), within the simplex."""
    q = soft.clone().requires_grad_(True)
    loss = 0
    for cs, p in zip(sets, outputs):
        sub = q[:, cs]
        v = ((p * sub).sum(dim=1) / (sub * sub).sum(dim=1)).detach()
        loss = loss + ((p - v[:, None] * sub) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, q)
    # scale invariance: drop the component along q
    return grad - (grad * q).sum(dim=1, keepdim=True) / (q * q).sum(dim=1, keepdim=True) * q


def _mf_lu_gradient(outputs, sets, soft):
    """Gradient in u = log q of the mf-lu objective, each teacher's (v_i, c_i) refitted to u.

    Shifting u is absorbed by c, so log q is a valid u; the scale is the one the answer chose.
    """
    u = torch.log(soft).clone().requires_grad_(True)
    loss = 0
    for cs, z in zip(sets, outputs):
        sub = u[:, cs]
        centred = sub - sub.mean(dim=1, keepdim=True)
        v = ((centred * (z - z.mean(dim=1, keepdim=True))).sum(dim=1) / (centred * centred).sum(dim=1)).clamp_min(0)
        c = z.mean(dim=1) - v * sub.mean(dim=1)
        loss = loss + ((z - v.detach()[:, None] * sub - c.detach()[:, None]) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, u)
    return grad


def test_mf_p_solution_is_stationary_on_inconsistent_teachers():
    problem = make(7, batch=40, classes=16, teachers=6, noise=0.3, link=2)
    soft, info = problem.estimate("mf-p")
    assert bool(info["converged"].all())
    assert bool((info["residual"] <= info["tol"]).all()) and bool((info["step"] <= info["tol"]).all())
    assert float(_mf_p_gradient(problem.outputs, problem.sets, soft).abs().max().detach()) < 1e-7
    # it starts from the ce estimate, which is exact on consistent teachers: no step needed there
    consistent = make(7, batch=40, classes=16, teachers=6, link=2)
    soft, info = consistent.estimate("mf-p")
    assert int(info["iterations"].max()) <= 1 and bool(info["converged"].all())
    torch.testing.assert_close(soft, consistent.truth, atol=tolerance("mf-p", torch.float64, "recovery"), rtol=0)


def test_mf_lu_solution_is_stationary_on_inconsistent_teachers():
    problem = make(8, batch=30, classes=16, teachers=6, inputs="logits", noise=0.2, link=3, coverage=0.5)
    soft, info = problem.estimate("mf-lu")
    assert bool(info["converged"].all())
    assert bool((info["residual"] <= info["tol"]).all()) and bool((info["step"] <= info["tol"]).all())
    assert int(info["iterations"].max()) <= 20
    assert float(_mf_lu_gradient(problem.outputs, problem.sets, soft).abs().max()) < 1e-7


def test_mf_lu_holds_scales_the_data_do_not_fix():
    """Teachers sharing fewer than two classes: a warning naming the groups, and each group's scale
    held at 1; with every teacher its own group, mf-lu is mf-lf."""
    sets = [[0, 1, 2, 3], [3, 4, 5], [5, 6, 7, 0]]
    q = random_soft_labels(6, 8, 9)
    outputs = noisy(consistent_outputs(q, sets, "logits", scales=[2.0, 1.0, 0.5]), 0.3, kind="logits")
    teachers = TeacherSet(sets)
    assert sorted(map(sorted, teachers.scale_components)) == [[0], [1], [2]]
    with pytest.warns(uhc_fast.UnidentifiableScalesWarning, match=r"3 groups"):
        soft, info = uhc_fast.estimate(outputs, teachers, "mf-lu", inputs="logits", return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per TeacherSet
        uhc_fast.estimate(outputs, teachers, "mf-lu", inputs="logits")
        lf = uhc_fast.estimate(outputs, teachers, "mf-lf", inputs="logits")
    assert bool(info["converged"].all()) and int(info["iterations"].max()) == 0
    torch.testing.assert_close(soft, lf, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["mf-p", "mf-lu"])
def test_converged_means_all_three_tests(method):
    """A row is converged only with its residual and its predicted correction within tol; capped
    rows report where they stopped."""
    problem = make(10, batch=24, classes=14, teachers=5, noise=0.8, link=3, coverage=0.5)
    for max_iter in (0, 1, 3, DEFAULT_MAX_ITER):
        soft, info = problem.estimate(method, max_iter=max_iter)
        converged = info["converged"]
        assert bool((info["residual"][converged] <= info["tol"]).all())
        assert bool((info["step"][converged] <= info["tol"]).all())
        assert int(info["iterations"].max()) <= max_iter
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(24, dtype=torch.float64))
    assert bool(converged.all())


# ---------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("method", NAMES)
def test_the_reference_computes_in_float64(method):
    """Float32 inputs are packed in float64 and the answer rounded to float32: the float64 answer of
    the same (rounded) inputs, to float32 rounding."""
    problem = make(11, batch=12, classes=13, teachers=4, noise=0.3, link=3, coverage=0.5)
    rounded = problem.tensors(torch.float32)
    options = Options(method=method)
    batch = convert(rounded, problem.teachers(), options)
    packed = pack(batch, "probs", torch.float64)
    assert packed.values.dtype == torch.float64 and packed.dtype == torch.float32
    assert pack(batch, "probs").values.dtype == torch.float32
    narrow, _ = problem.estimate(method, outputs=rounded, tol=1e-12)
    wide, _ = problem.estimate(method, outputs=[x.double() for x in rounded], tol=1e-12)
    assert narrow.dtype == torch.float32
    torch.testing.assert_close(narrow.double(), wide, atol=2 * torch.finfo(torch.float32).eps, rtol=0)


# ---------------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("method", NAMES)
def test_invariances(method):
    problem = make(9, batch=16, classes=14, teachers=5, noise=0.3, link=3, coverage=0.5)
    sets, outputs = problem.sets, problem.outputs
    kwargs = {"tol": 1e-12} if method != "sd" else {}
    base = uhc_fast.estimate(outputs, sets, method, **kwargs)
    order = [3, 0, 4, 2, 1]
    permuted_teachers = uhc_fast.estimate([outputs[i] for i in order], [sets[i] for i in order], method, **kwargs)
    torch.testing.assert_close(permuted_teachers, base, atol=1e-8, rtol=0)

    relabel = np.random.default_rng(0).permutation(14)  # class k becomes relabel[k]
    relabelled = uhc_fast.estimate(outputs, [[int(relabel[c]) for c in cs] for cs in sets], method, **kwargs)
    torch.testing.assert_close(relabelled[:, relabel], base, atol=1e-8, rtol=0)

    columns = [np.random.default_rng(i).permutation(len(cs)) for i, cs in enumerate(sets)]
    shuffled = uhc_fast.estimate(
        [p[:, c] for p, c in zip(outputs, columns)],
        [[cs[j] for j in c] for cs, c in zip(sets, columns)],
        method,
        **kwargs,
    )
    torch.testing.assert_close(shuffled, base, atol=1e-8, rtol=0)

    halves = uhc_fast.estimate(
        [*outputs, outputs[2]], [*sets, sets[2]], method, weights=[1, 1, 0.5, 1, 1, 0.5], **kwargs
    )
    torch.testing.assert_close(halves, base, atol=1e-8, rtol=0)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    num_classes=st.integers(2, 12),
    num_teachers=st.integers(1, 5),
    coverage=st.floats(0.2, 0.9),
    noise=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_ce_properties(num_classes, num_teachers, coverage, noise, seed):
    """Any connected problem: a distribution, at the KKT point, the same for weights scaled together."""
    problem = make(seed, batch=5, classes=num_classes, teachers=num_teachers, coverage=coverage, noise=noise)
    soft, info = problem.estimate("ce")
    assert bool((soft >= 0).all())
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5, dtype=torch.float64))
    assert bool(info["converged"].all())
    scaled, _ = problem.estimate("ce", weights=[3.0] * num_teachers)
    torch.testing.assert_close(scaled, soft, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------- identifiability
def test_disconnected_graph_warns_once_naming_components_and_alpha_resolves():
    sets = [[0, 1], [1, 2], [3, 4]]
    teachers = TeacherSet(sets)
    assert teachers.components == [[0, 1, 2], [3, 4]]
    q = random_soft_labels(4, 5, 0)
    outputs = consistent_outputs(q, sets)
    with pytest.warns(uhc_fast.DisconnectedClassesWarning, match=r"2 components \[\[0, 1, 2\], \[3, 4\]\]"):
        soft, info = uhc_fast.estimate(outputs, teachers, "ce", return_info=True)
    assert info["alpha"] == uhc_fast.DEFAULT_DISCONNECTED_ALPHA and info["components"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uhc_fast.estimate(outputs, teachers, "ce")  # this TeacherSet has warned already
        explicit = uhc_fast.estimate(outputs, sets, "ce", alpha=1e-3)
    with pytest.warns(uhc_fast.DisconnectedClassesWarning):  # alpha=0 asks for no prior: still warned
        uhc_fast.estimate(outputs, sets, "sd", alpha=0)
    # within each component the teachers decide; the prior only splits mass between components
    for part in ([0, 1, 2], [3, 4]):
        expected = q[:, part] / q[:, part].sum(dim=1, keepdim=True)
        got = explicit[:, part] / explicit[:, part].sum(dim=1, keepdim=True)
        torch.testing.assert_close(got, expected, atol=5e-3, rtol=0)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_declared_uncovered_class_gets_zero_mass_and_is_reported():
    sets = [[0, 1], [1, 3]]
    q = random_soft_labels(3, 4, 1)
    q[:, 2] = 0
    q = q / q.sum(dim=1, keepdim=True)
    outputs = consistent_outputs(q, sets)
    relabelled = [[0, 1], [1, 2]]  # the same teachers without the gaps
    for method in NAMES:
        soft, info = uhc_fast.estimate(outputs, sets, method, num_classes=5, return_info=True)
        assert soft.shape == (3, 5)
        assert bool((soft[:, [2, 4]] == 0).all())
        assert info["uncovered_classes"] == [2, 4]
        torch.testing.assert_close(soft[:, [0, 1, 3]], uhc_fast.estimate(outputs, relabelled, method))
