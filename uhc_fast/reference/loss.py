"""The direct `ce` training loss on student logits (the reference every backend's loss matches)."""

from __future__ import annotations

import torch

from ..inputs import PackedProblem, segment_logsumexp


def direct_ce_loss(student_logits: torch.Tensor, problem: PackedProblem) -> torch.Tensor:
    """Per-sample loss ``sum_i w_i [logsumexp_{L_i} u - sum_{l in L_i} p_il u_l]``, ``(B,)``.

    Its gradient is ``sum_{i: l in L_i} w_i (softmax_{L_i}(u)_l - p_il)``, by autograd. The
    student's logits and the problem's values are promoted to a common dtype.
    """
    layout = problem.layout
    dtype = torch.promote_types(student_logits.dtype, problem.values.dtype)
    u, values, w = student_logits.to(dtype), problem.values.to(dtype), problem.weights.to(dtype)
    packed = u[:, layout.class_index]
    lse = segment_logsumexp(packed, layout)
    return lse @ w - (packed * values * w[layout.teacher_index]).sum(dim=1)
