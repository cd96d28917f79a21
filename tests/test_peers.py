"""The benchmark peers answer the same `ce` problem as uhc_fast: an independent check of both.

choix fits a Luce choice model to integer top-1 counts; when the teachers' outputs are exact count
ratios ``c_il / C_i`` and teacher ``i`` has weight ``C_i``, its maximum likelihood is our `ce`
optimum exactly. scipy's L-BFGS-B minimises the same objective in ``u = log q``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import uhc_fast

_PEERS_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    if not _PEERS_PATH.exists():
        pytest.skip("benchmarks/peers.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("uhc_bench_peers", _PEERS_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


# Overlapping class sets over K = 7 with one teacher per pair of neighbours plus a wide one: connected.
CLASS_SETS = [[0, 1, 2], [2, 3], [3, 4, 5, 6], [6, 0], [1, 3, 5]]
K = 7


def _count_problem(seed: int, total: int = 40):
    """Per-teacher integer counts (every class counted at least once) and their ratios ``p_i``."""
    rng = np.random.default_rng(seed)
    counts = [1 + rng.multinomial(total - len(cs), rng.dirichlet(np.ones(len(cs)))) for cs in CLASS_SETS]
    probs = [c / c.sum() for c in counts]
    return counts, probs


def _ours(probs, weights) -> np.ndarray:
    outputs = [p[None, :].astype(np.float64) for p in probs]
    return uhc_fast.estimate(outputs, CLASS_SETS, method="ce", weights=weights, backend="torch", tol=1e-13)[0]


@pytest.mark.parametrize("solver", ["ilsr", "mm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choix_matches_ce_on_exact_counts(peers, solver, seed):
    pytest.importorskip("choix")
    counts, probs = _count_problem(seed)
    weights = np.array([c.sum() for c in counts], dtype=np.float64)
    layout = peers.PackedLayout.from_class_sets(CLASS_SETS, K)
    packed = np.concatenate(probs)
    # scale 1 with weights C_i reproduces the counts exactly: the identical likelihood
    data = peers.choix_data(packed, weights, layout, scale=1.0)
    assert sum(1 for _ in data) == sum(int(c.sum()) for c in counts)
    theirs = peers.choix_ce(data, K, solver=solver, tol=1e-12, max_iter=100000)
    assert theirs.converged
    ours = _ours(probs, weights)
    np.testing.assert_allclose(theirs.q, ours, rtol=1e-6, atol=1e-9)
    # and choix's answer satisfies our optimality condition
    assert peers.kkt_residual(theirs.q, packed, weights, layout) < 1e-6


def test_choix_rounded_counts_agree_to_scale(peers):
    """With generic probabilities the counts are rounded: agreement to about 1/scale."""
    pytest.importorskip("choix")
    rng = np.random.default_rng(5)
    probs = [rng.dirichlet(np.ones(len(cs)) * 3) for cs in CLASS_SETS]
    weights = np.ones(len(CLASS_SETS))
    layout = peers.PackedLayout.from_class_sets(CLASS_SETS, K)
    packed = np.concatenate(probs)
    theirs = peers.choix_ce(peers.choix_data(packed, weights, layout, scale=2000.0), K)
    ours = _ours(probs, weights)
    assert np.abs(theirs.q - ours).max() < 5e-3


@pytest.mark.parametrize("seed", [0, 3])
def test_scipy_matches_ce(peers, seed):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(seed)
    probs = [rng.dirichlet(np.ones(len(cs))) for cs in CLASS_SETS]
    weights = rng.uniform(0.5, 2.0, len(CLASS_SETS))
    layout = peers.PackedLayout.from_class_sets(CLASS_SETS, K)
    packed = np.concatenate(probs)
    theirs = peers.scipy_ce(packed, weights, layout, tol=1e-9)
    assert theirs.converged
    # L-BFGS-B may also stop when f stops decreasing in float64, just short of gtol
    assert peers.kkt_residual(theirs.q, packed, weights, layout) <= 1e-8
    np.testing.assert_allclose(theirs.q, _ours(probs, weights), rtol=1e-6, atol=1e-9)


def test_objective_gradient_matches_autograd(peers):
    """The scipy peer's hand-written gradient against torch autograd of the reference loss."""
    from uhc_fast.inputs import convert, pack
    from uhc_fast.options import Options
    from uhc_fast.reference import direct_ce_loss

    rng = np.random.default_rng(7)
    probs = [rng.dirichlet(np.ones(len(cs))) for cs in CLASS_SETS]
    weights = rng.uniform(0.5, 2.0, len(CLASS_SETS))
    layout = peers.PackedLayout.from_class_sets(CLASS_SETS, K)
    u = rng.normal(size=K)
    value, grad = peers.ce_objective(u, np.concatenate(probs), weights, layout)

    batch = convert(
        [torch.from_numpy(p[None, :]) for p in probs], uhc_fast.TeacherSet(CLASS_SETS), Options(weights=weights)
    )
    problem = pack(batch, "probs", torch.float64)
    ut = torch.tensor(u[None, :], requires_grad=True)
    loss = direct_ce_loss(ut, problem).sum()
    loss.backward()
    assert value == pytest.approx(float(loss.detach()), rel=1e-12)
    np.testing.assert_allclose(grad, ut.grad[0].numpy(), rtol=1e-10, atol=1e-12)
