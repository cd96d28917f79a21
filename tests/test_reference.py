"""The torch reference against float64 math and independent formulations."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import uhc_fast
from uhc_fast.inputs import pack
from uhc_fast.problem import TeacherSet
from uhc_fast.reference.ce import kkt_residual
from uhc_fast.reference.common import evidence

from .problems import consistent_outputs, noisy, random_class_sets, random_soft_labels

RECOVERING = ("ce", "mf-p", "mf-lf")


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """These tests define correct: they run the torch reference whatever else is built."""
    monkeypatch.setenv("UHC_FAST_BACKEND", "torch")


def make(num_classes=23, num_teachers=7, batch=64, coverage=0.3, seed=0):
    rng = np.random.default_rng(seed)
    sets = random_class_sets(num_classes, num_teachers, coverage, rng)
    q = random_soft_labels(batch, num_classes, seed)
    return sets, q


# ---------------------------------------------------------------------------- exact recovery
@pytest.mark.parametrize("method", RECOVERING)
@pytest.mark.parametrize("kind", ["probs", "logits"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_recovery_from_consistent_teachers(method, kind, seed):
    sets, q = make(num_classes=17 + seed, num_teachers=5 + seed, seed=seed)
    outputs = consistent_outputs(q, sets, kind)
    soft = uhc_fast.estimate(outputs, sets, method, inputs=kind)
    assert soft.dtype == torch.float64
    torch.testing.assert_close(soft, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_mf_lu_recovers_teachers_at_different_temperatures(seed):
    sets, q = make(num_classes=19, num_teachers=6, seed=seed)
    # the overall scale is not identifiable: temperatures with mean(1/T) = 1 match mean(v) = 1
    inverse = torch.tensor([0.5, 1.5, 0.8, 1.2, 0.7, 1.3], dtype=torch.float64)
    outputs = consistent_outputs(q, sets, "logits", temperatures=(1 / inverse).tolist())
    soft, info = uhc_fast.estimate(outputs, sets, "mf-lu", inputs="logits", return_info=True)
    torch.testing.assert_close(soft, q, atol=1e-6, rtol=0)
    assert bool(info["converged"].all())
    # the fixed-scale method cannot absorb the temperatures
    assert (uhc_fast.estimate(outputs, sets, "mf-lf", inputs="logits") - q).abs().max() > 1e-2


def test_sd_is_biased_towards_classes_many_teachers_cover():
    # class 0 is covered by all three teachers, every other class by one; truth is uniform
    sets = [[0, 1, 2], [0, 3, 4], [0, 5, 6]]
    q = torch.full((4, 7), 1 / 7, dtype=torch.float64)
    outputs = consistent_outputs(q, sets)
    sd = uhc_fast.estimate(outputs, sets, "sd")
    ce = uhc_fast.estimate(outputs, sets, "ce")
    assert bool((sd[:, 0] > 2 * sd[:, 1]).all())
    torch.testing.assert_close(ce, q, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------- ce
def test_ce_reaches_tolerance_in_few_newton_steps_on_inconsistent_teachers():
    sets, q = make(num_classes=40, num_teachers=10, batch=200, seed=3)
    outputs = noisy(consistent_outputs(q, sets), 0.5)
    soft, info = uhc_fast.estimate(outputs, sets, "ce", return_info=True)
    assert info["tol"] <= 1e-6
    assert bool((info["residual"] <= info["tol"]).all())
    # Newton: a handful of steps where MM needs hundreds (see test_ce_matches_mm)
    assert int(info["iterations"].max()) <= 15
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(200, dtype=torch.float64))


def test_ce_matches_an_independent_mm_solver():
    """Zermelo/Hunter MM iterations in float64 reach the same optimum."""
    sets, q = make(num_classes=15, num_teachers=5, batch=32, seed=4)
    outputs = noisy(consistent_outputs(q, sets), 0.4)
    problem, _ = pack(outputs, TeacherSet(sets))
    mask = problem.layout.mask_as(torch.float64)
    w = problem.weights
    n = evidence(problem)
    mm = n / n.sum(dim=1, keepdim=True)
    sweeps = 0
    while float(kkt_residual(mm, n, mask, w).max()) >= 1e-12 and sweeps < 20000:
        mm = n / ((w / (mm @ mask.T)) @ mask)
        mm = mm / mm.sum(dim=1, keepdim=True)
        sweeps += 1
    assert sweeps > 50  # the slow baseline that Newton replaces
    soft = uhc_fast.estimate(outputs, sets, "ce")
    torch.testing.assert_close(soft, mm, atol=1e-8, rtol=0)


def test_ce_matches_scipy_on_the_primal_objective():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    sets, q = make(num_classes=9, num_teachers=4, batch=3, seed=5)
    outputs = noisy(consistent_outputs(q, sets), 0.6)
    soft = uhc_fast.estimate(outputs, sets, "ce")
    for b in range(3):

        def objective(u, b=b):
            total = 0.0
            for cs, p in zip(sets, outputs):
                sub = u[cs]
                lse = np.log(np.exp(sub - sub.max()).sum()) + sub.max()
                total += lse - float(p[b].numpy() @ sub)
            return total

        res = scipy_optimize.minimize(objective, np.zeros(9), method="BFGS", options={"gtol": 1e-10})
        expected = np.exp(res.x - res.x.max())
        np.testing.assert_allclose(soft[b].numpy(), expected / expected.sum(), atol=1e-5)


# ---------------------------------------------------------------------------- mf
def test_mf_lf_matches_the_full_design_pseudo_inverse():
    sets, q = make(num_classes=13, num_teachers=5, batch=20, seed=6)
    outputs = consistent_outputs(q, sets, "logits")
    gen = torch.Generator().manual_seed(0)
    outputs = [z + 0.3 * torch.randn(z.shape, generator=gen, dtype=z.dtype) for z in outputs]
    weights = [1.0, 2.0, 0.5, 1.5, 1.0]
    soft = uhc_fast.estimate(outputs, sets, "mf-lf", inputs="logits", weights=weights)
    # rows: one per (teacher, class) entry; columns: u (K) then c (N)
    rows = [(i, k) for i, cs in enumerate(sets) for k in cs]
    design = np.zeros((len(rows), 13 + 5))
    for r, (i, k) in enumerate(rows):
        design[r, k] = design[r, 13 + i] = 1
    sqrt_w = np.sqrt([weights[i] for i, _ in rows])
    z = torch.cat(outputs, dim=1).numpy()
    solution = np.linalg.lstsq(design * sqrt_w[:, None], (z * sqrt_w).T, rcond=None)[0].T
    u = solution[:, :13]
    expected = np.exp(u - u.max(axis=1, keepdims=True))
    np.testing.assert_allclose(soft.numpy(), expected / expected.sum(axis=1, keepdims=True), atol=1e-10)


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
    sets, q = make(num_classes=16, num_teachers=6, batch=40, seed=7)
    outputs = noisy(consistent_outputs(q, sets), 0.3)
    soft, info = uhc_fast.estimate(outputs, sets, "mf-p", return_info=True)
    assert bool(info["converged"].all())
    assert float(_mf_p_gradient(outputs, sets, soft).abs().max().detach()) < 1e-6


def test_mf_lu_solution_is_stationary_on_inconsistent_teachers():
    sets, q = make(num_classes=16, num_teachers=6, batch=30, seed=8)
    outputs = consistent_outputs(q, sets, "logits")
    gen = torch.Generator().manual_seed(1)
    outputs = [z + 0.2 * torch.randn(z.shape, generator=gen, dtype=z.dtype) for z in outputs]
    soft, info = uhc_fast.estimate(outputs, sets, "mf-lu", inputs="logits", return_info=True)
    assert bool(info["converged"].all())
    assert float(_mf_lu_gradient(outputs, sets, soft).abs().max()) < 1e-6


# ---------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("method", list(uhc_fast.METHODS))
def test_invariances(method):
    sets, q = make(num_classes=14, num_teachers=5, batch=16, seed=9)
    outputs = noisy(consistent_outputs(q, sets), 0.3)
    kwargs = {"tol": 1e-12} if method != "sd" else {}
    base = uhc_fast.estimate(outputs, sets, method, **kwargs)

    order = [3, 0, 4, 2, 1]
    permuted_teachers = uhc_fast.estimate([outputs[i] for i in order], [sets[i] for i in order], method, **kwargs)
    torch.testing.assert_close(permuted_teachers, base, atol=1e-8, rtol=0)

    relabel = np.random.default_rng(0).permutation(14)  # class k becomes relabel[k]
    relabelled = uhc_fast.estimate(outputs, [[int(relabel[c]) for c in cs] for cs in sets], method, **kwargs)
    torch.testing.assert_close(relabelled[:, relabel], base, atol=1e-8, rtol=0)

    halves = uhc_fast.estimate(
        [*outputs, outputs[2]], [*sets, sets[2]], method, weights=[1, 1, 0.5, 1, 1, 0.5], **kwargs
    )
    torch.testing.assert_close(halves, base, atol=1e-8, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    num_classes=st.integers(2, 12),
    num_teachers=st.integers(1, 5),
    coverage=st.floats(0.2, 0.9),
    noise=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_ce_properties(num_classes, num_teachers, coverage, noise, seed):
    """Any connected problem: a distribution, at the KKT point, the same for weights scaled together."""
    sets, q = make(num_classes, num_teachers, batch=5, coverage=coverage, seed=seed)
    outputs = noisy(consistent_outputs(q, sets), noise, seed)
    soft, info = uhc_fast.estimate(outputs, sets, "ce", return_info=True)
    assert bool((soft >= 0).all())
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5, dtype=torch.float64))
    assert bool(info["converged"].all())
    scaled = uhc_fast.estimate(outputs, sets, "ce", weights=[3.0] * num_teachers)
    torch.testing.assert_close(scaled, soft, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------- dtypes and devices
@pytest.mark.parametrize("method", list(uhc_fast.METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_compute_in_float32(method, dtype):
    sets, q = make(num_classes=11, num_teachers=4, batch=8, seed=10)
    outputs = consistent_outputs(q, sets)
    exact = uhc_fast.estimate(outputs, sets, method)
    low = uhc_fast.estimate([p.to(dtype) for p in outputs], sets, method)
    assert low.dtype == torch.float32
    # rounding the inputs to `dtype` is the only error source worth its name
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(low.double(), exact, atol=tol, rtol=0)


@pytest.mark.parametrize("method", list(uhc_fast.METHODS))
def test_numpy_in_numpy_out(method):
    sets, q = make(num_classes=9, num_teachers=4, batch=6, seed=11)
    outputs = consistent_outputs(q, sets)
    soft = uhc_fast.estimate([p.numpy() for p in outputs], sets, method)
    assert isinstance(soft, np.ndarray)
    np.testing.assert_allclose(soft, uhc_fast.estimate(outputs, sets, method).numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(uhc_fast.METHODS))
def test_cuda_tensors_match_cpu(method):
    sets, q = make(num_classes=21, num_teachers=6, batch=33, seed=12)
    outputs = noisy(consistent_outputs(q, sets), 0.2)
    cpu = uhc_fast.estimate(outputs, sets, method, backend="torch")
    gpu = uhc_fast.estimate([p.cuda() for p in outputs], sets, method, backend="torch")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------- identifiability
def test_disconnected_graph_warns_once_naming_components_and_alpha_resolves():
    sets = [[0, 1], [1, 2], [3, 4]]
    teachers = TeacherSet(sets)
    assert teachers.components == [[0, 1, 2], [3, 4]]
    q = random_soft_labels(4, 5, 0)
    outputs = consistent_outputs(q, sets)
    with pytest.warns(uhc_fast.DisconnectedClassesWarning, match=r"2 components \[\[0, 1, 2\], \[3, 4\]\]"):
        soft = uhc_fast.estimate(outputs, teachers, "ce")
    with pytest.warns(uhc_fast.DisconnectedClassesWarning) as record:
        uhc_fast.estimate(outputs, TeacherSet(sets), "ce")
        uhc_fast.estimate(outputs, TeacherSet(sets), "ce")
    assert len(record) >= 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uhc_fast.estimate(outputs, teachers, "ce")  # this TeacherSet has warned already
        explicit = uhc_fast.estimate(outputs, sets, "ce", alpha=1e-3)
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
    for method in uhc_fast.METHODS:
        soft, info = uhc_fast.estimate(outputs, sets, method, num_classes=5, return_info=True)
        assert soft.shape == (3, 5)
        assert bool((soft[:, [2, 4]] == 0).all())
        assert info["uncovered_classes"] == [2, 4]
        torch.testing.assert_close(soft[:, [0, 1, 3]], uhc_fast.estimate(outputs, relabelled, method))
