"""Solver settings every backend shares, written once for Python.

The compiled core has the same block in ``csrc/core/constants.h`` and the Triton kernels receive
these values as arguments; ``tests/test_constants.py`` checks that the languages agree.
"""

from __future__ import annotations

import torch

# Steps (Newton or Gauss-Newton) an iterative solver takes at most when the caller gives no max_iter.
DEFAULT_MAX_ITER = 100
# Backtracking line searches: sufficient decrease (Armijo) and how often a step may be halved.
ARMIJO = 1e-4
MAX_HALVINGS = 40
# The smallest teacher scale `mf-lu` allows (scales are about 1 on average): a teacher whose logits
# barely vary would otherwise drive its scale to 0, where its shift alone fits it.
MIN_SCALE = 1e-3
# The largest step the Newton iterations take in a log-scale variable (`ce`'s dual t, the mf-p and
# mf-lu log scales): a factor e^2. Far from the optimum a Newton step can ask for far more than
# its quadratic model holds (a weakly linked teacher's t moved by hundreds).
MAX_LOG_STEP = 2.0
# `ce` reports convergence only where its Newton step is at most this in every log-scale t_i, on top
# of its two tolerances: where the step is longer, the quadratic model is not yet to be trusted (a
# class whose mass is 0.9 at the optimum can sit at 1e-10 with its teacher's t stepping by about 1
# a step, Newton's pace on an exponential, while the step's first-order change of the soft labels
# is 1e-10 and passes `tol`). Rows above it iterate on.
CONVERGED_LOG_STEP = 0.25
# `ce`'s line search compares F's change, less this many float64 units of roundoff of the terms it is
# summed from, with Armijo's bound: a step whose change is lost in that rounding is taken (F cannot
# rise by more). On the rounded value, rows whose remaining steps move teachers of tiny mass (their
# change of F below the rounding of the larger groups' terms) stalled unconverged at errors of 1e-12.
CHANGE_ROUNDING = 8 * 2.0**-53
# Probabilities are clamped to this before taking logs (logit-space methods).
DEFAULT_EPS = 1e-12
# The weight of the uniform prior teacher when the class-overlap graph is disconnected and the
# caller gave no alpha.
DEFAULT_DISCONNECTED_ALPHA = 1e-2
# How far a probability row may sum from 1, per input dtype (rounding of a stored softmax).
SUM_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-6}


def default_tol(dtype: torch.dtype) -> float:
    """The tolerance the iterative methods stop at when the caller gives none, for computation in
    ``dtype`` (float64, or float32 for every narrower input)."""
    return 1e-9 if dtype == torch.float64 else 1e-5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solvers compute and return soft labels in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
