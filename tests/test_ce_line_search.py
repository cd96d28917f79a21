"""The bound the compiled `ce` line search accepts full steps by (csrc/core/ce.h: full_step_bound).

``F(t) = sum_g N_g log sum_{i in g} exp(t_i) - e.t`` is the dual `ce` minimises. The compiled solver
accepts a step without F's per-group logarithms where

    F(t + step) - F(t) <= slope + quad (e^x - 1 - x) / x^2,   x = max step - min step,

with ``slope = grad F . step`` and ``quad = step' H step = sum_g N_g Var_{pi_g}(step)``, passes
Armijo's test. These tests check the inequality itself, in float64 with numpy, for arbitrary steps
(not only Newton's) on random groups, with the exact change formed term by term.
"""

from __future__ import annotations

import numpy as np
import pytest


def phi(x: float) -> float:
    """``(e^x - 1 - x) / x^2`` = the integral of ``(1 - s) e^{x s}`` over [0, 1]."""
    return 0.5 + x / 6 + x * x / 24 if x < 1e-4 else (np.expm1(x) - x) / (x * x)


def draw(rng: np.random.Generator):
    teachers = int(rng.integers(2, 9))
    groups = [
        rng.choice(teachers, size=int(rng.integers(1, teachers + 1)), replace=False)
        for _ in range(int(rng.integers(1, 40)))
    ]
    mass = rng.exponential(size=len(groups)) * 10.0 ** rng.uniform(-9, 3, size=len(groups))  # N_g, tiny to large
    t = rng.normal(scale=float(rng.choice([0.1, 3.0, 20.0])), size=teachers)
    step = rng.uniform(-2, 2, size=teachers) * 10.0 ** rng.uniform(-7, 0)  # ce caps steps at 2
    return groups, mass, t, step


def change_and_bound(groups, mass, t, step):
    """F(t + step) - F(t) without its linear part (it cancels on both sides), and the bound."""
    change = slope = quad = 0.0
    for g, n in zip(groups, mass, strict=True):
        pi = np.exp(t[g] - t[g].max())
        pi /= pi.sum()
        mean = pi @ step[g]
        change += n * np.log1p(pi @ np.expm1(step[g]))  # log(sum pi e^step), without cancellation
        slope += n * mean
        quad += n * (pi @ (step[g] - mean) ** 2)
    x = float(step.max() - step.min())
    return change, slope + quad * phi(x), slope, quad


@pytest.mark.parametrize("seed", range(10))
def test_the_bound_holds_for_arbitrary_steps(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        change, bound, slope, quad = change_and_bound(*draw(rng))
        assert change <= bound + 1e-12 * (abs(slope) + quad), (change, bound)


def test_the_bound_is_tight_for_small_steps():
    """Second-order accurate: the slack is O(x) of the curvature term, so small steps are accepted."""
    rng = np.random.default_rng(0)
    groups, mass, t, step = draw(rng)
    for scale in (1e-2, 1e-3, 1e-4):
        small = step / np.abs(step).max() * scale
        change, bound, _, quad = change_and_bound(groups, mass, t, small)
        assert 0 <= bound - change <= 2 * scale * quad
