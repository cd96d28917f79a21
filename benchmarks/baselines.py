"""Baselines the compiled backend is measured against, besides the torch reference.

* :func:`mm_ce`: the plain MM (Zermelo / Hunter) iteration for `ce`, written as anyone would in torch:
  two dense GEMMs against the ``(N, K)`` mask per iteration, batched over samples, run until each
  row's relative KKT residual (the math notes' criterion, ``max_l |q_l sum_{i covers l} w_i /
  S_i(q) / n_l - 1|``) is at most ``tol``; converged rows leave the batch. It stops on that residual
  alone (``estimate`` also asks for a small Newton correction), which favours it.
* :func:`copy_floor`: the memory floor of one call: read every teacher's array once and write a
  fresh ``(B, K)`` output (allocated per call, as ``estimate``'s is). ``sd`` and ``mf-lf`` have
  nothing else to do.
* :func:`relative_kkt`: the relative KKT residual of any answer, in float64 from the teachers'
  arrays: every `ce` row of every table is checked with it, whoever computed it.

Teacher weights are 1 throughout (the benchmark workloads use none).
"""

from __future__ import annotations

import numpy as np
import torch

from uhc_fast import TeacherSet


def _tensors(outputs) -> list[torch.Tensor]:
    return [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in outputs]


def evidence(outputs, teachers: TeacherSet, dtype: torch.dtype) -> torch.Tensor:
    """``n_l = sum_{i covers l} p_il`` ``(B, K)`` in ``dtype``, each teacher's row renormalised."""
    xs = [x.to(dtype) for x in _tensors(outputs)]
    p = torch.cat([x / x.sum(dim=1, keepdim=True) for x in xs], dim=1)
    index = teachers.layout(p.device).class_index
    return p.new_zeros(p.shape[0], teachers.num_classes).index_add_(1, index, p)


def mm_ce(
    outputs, teachers: TeacherSet, tol: float = 1e-5, max_iter: int = 100_000, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ce` by plain MM from the teachers' arrays: ``(soft (B, K), iterations (B,))``."""
    n = evidence(outputs, teachers, dtype)
    mask = teachers.mask.to(device=n.device, dtype=dtype)  # (N, K)
    q = n / n.sum(dim=1, keepdim=True)  # the sd estimate
    soft, iterations = torch.empty_like(q), torch.full((q.shape[0],), max_iter, dtype=torch.int64)
    rows = torch.arange(q.shape[0])
    for it in range(max_iter + 1):
        denom = (1 / (q @ mask.T)) @ mask  # sum_{i covers l} w_i / S_i(q)
        done = (q * denom / n - 1).nan_to_num(0).abs().amax(dim=1) <= tol
        if bool(done.any()) or it == max_iter:
            done = done | (it == max_iter)
            soft[rows[done]], iterations[rows[done]] = q[done], it
            rows, q, n, denom = rows[~done], q[~done], n[~done], denom[~done]
            if rows.numel() == 0:
                break
        q = torch.where(n > 0, n / denom, 0)
        q = q / q.sum(dim=1, keepdim=True)
    return soft, iterations


def relative_kkt(soft, outputs, teachers: TeacherSet) -> torch.Tensor:
    """Per row, ``max_l |q_l sum_{i covers l} 1 / S_i(q) / n_l - 1|`` over classes with evidence, in float64."""
    q = torch.as_tensor(np.asarray(soft) if isinstance(soft, np.ndarray) else soft).double()
    n = evidence(outputs, teachers, torch.float64)
    mask = teachers.mask.to(torch.float64)
    denom = (1 / (q @ mask.T).clamp_min(torch.finfo(torch.float64).tiny)) @ mask
    gap = torch.where(n > 0, q * denom / n.clamp_min(torch.finfo(torch.float64).tiny) - 1, 0)
    return gap.abs().amax(dim=1)


def copy_floor(outputs, num_classes: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Read every teacher's array once (a row sum, which streams) and write a fresh ``(B, K)`` output."""
    xs = _tensors(outputs)
    sums = [x.sum(dim=1) for x in xs]
    out = torch.empty(xs[0].shape[0], num_classes, dtype=out_dtype)
    out.fill_(1.0 / num_classes)
    del sums
    return out


def floor_bytes(outputs, num_classes: int, out_itemsize: int = 4) -> int:
    """Bytes one call must move at least: every input element read once, the ``(B, K)`` output written once."""
    xs = _tensors(outputs)
    return sum(x.numel() * x.element_size() for x in xs) + xs[0].shape[0] * num_classes * out_itemsize
