"""`mf-lf`: least squares in logit space with one shift per teacher (a closed form).

Teacher weights weight each teacher's squared residuals (default 1, as in the math notes).
"""

from __future__ import annotations

import torch

from ..inputs import PackedProblem, Solution, scatter_classes, segment_sum
from .common import masked_softmax


def fit(problem: PackedProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, c)`` minimising ``sum_i w_i sum_{l in L_i} (z_il - u_l - c_i)^2``; O(nnz + N^2) per sample.

    ``u_l = zbar_l - sum_{i covers l} w_i c_i / W_l`` with ``zbar`` the weighted mean of the
    teachers' logits of class l, and ``c`` from the eliminated system of
    :meth:`~uhc_fast.problem.Layout.mf_lf_system` (the heaviest teacher's shift is 0: the gauge).
    """
    z, layout, w = problem.values, problem.layout, problem.weights
    wt = w[layout.teacher_index]
    class_weight = w @ layout.mask_as(z.dtype)
    safe = torch.where(layout.covered, class_weight, 1)
    zbar = scatter_classes(wt * z, layout) / safe
    b = segment_sum(z - zbar[:, layout.class_index], layout)
    c = b @ layout.mf_lf_system(w, z.dtype).T
    u = zbar - scatter_classes(wt * c[:, layout.teacher_index], layout) / safe
    return u, c


def solve_mf_lf(problem: PackedProblem, tol: float, max_iter: int) -> Solution:
    """Closed form: one linear solve whose matrix depends on the mask and weights alone."""
    u, _ = fit(problem)
    return Solution(masked_softmax(u, problem.layout.covered).to(problem.dtype))
