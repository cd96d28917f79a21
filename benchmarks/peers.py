"""Peers for the `ce` problem, one sample at a time: choix (Luce choice models) and scipy.optimize.

Both answer the same per-sample problem as ``uhc_fast.estimate(method="ce")``:

    min over the simplex  J(q) = - sum_i w_i sum_{l in L_i} p_il log(q_l / S_i(q)).

* ``choix`` fits a Luce model to top-1 choices. Teacher ``i``'s soft output becomes integer counts
  ``c_il = round(scale * w_i * p_il)``: ``c_il`` observations of class ``l`` chosen from ``L_i``. Its
  log-likelihood is then ``-scale * J`` up to the rounding of the counts, so the answers agree to
  about ``1 / scale`` (exactly, when the outputs are multiples of ``1 / scale``). choix has no
  weighted data, so the counts are repeated records; its cost grows with ``scale``.
* ``scipy`` minimises ``J`` in ``u = log q`` (unconstrained; ``J`` is shift-invariant in ``u``) with
  L-BFGS-B and an exact vectorised gradient, stopping when the largest gradient entry divided by
  ``sum w`` (the absolute KKT residual, ``info["abs_residual"]`` of ``ce``) is below ``tol``.

This module depends only on numpy (plus scipy / choix, imported lazily), so the test suite can load
it by path. Everything here is float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackedLayout:
    """numpy copy of a packed layout: ``class_index``/``teacher_index`` ``(nnz,)``, ``offsets`` ``(N+1,)``."""

    class_index: np.ndarray
    teacher_index: np.ndarray
    offsets: np.ndarray
    num_classes: int

    @classmethod
    def from_class_sets(cls, class_sets: Sequence[Sequence[int]], num_classes: int) -> PackedLayout:
        sizes = np.array([len(cs) for cs in class_sets], dtype=np.int64)
        offsets = np.zeros(len(class_sets) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(sizes)
        class_index = np.array([c for cs in class_sets for c in cs], dtype=np.int64)
        teacher_index = np.repeat(np.arange(len(class_sets)), sizes)
        return cls(class_index, teacher_index, offsets, int(num_classes))

    @property
    def num_teachers(self) -> int:
        return len(self.offsets) - 1

    def segment_sum(self, x: np.ndarray) -> np.ndarray:
        """``(nnz,) -> (N,)`` per-teacher sums (every teacher has >= 1 class, so reduceat is exact)."""
        return np.add.reduceat(x, self.offsets[:-1])

    def scatter(self, x: np.ndarray) -> np.ndarray:
        """``(nnz,) -> (K,)``: add each packed entry into its class."""
        return np.bincount(self.class_index, weights=x, minlength=self.num_classes)


def kkt_residual(q: np.ndarray, p: np.ndarray, weights: np.ndarray, layout: PackedLayout) -> float:
    """``max_l |q_l sum_{i: l in L_i} w_i / S_i(q) - n_l| / sum w`` for one sample (float64).

    Args: ``q`` ``(K,)`` on the simplex, ``p`` ``(nnz,)`` packed per-teacher probabilities, ``weights`` ``(N,)``.
    """
    s = layout.segment_sum(q[layout.class_index])
    coef = layout.scatter((weights / np.maximum(s, np.finfo(np.float64).tiny))[layout.teacher_index])
    n = layout.scatter(weights[layout.teacher_index] * p)
    return float(np.abs(q * coef - n).max() / weights.sum())


def _softmax(u: np.ndarray) -> np.ndarray:
    e = np.exp(u - u.max())
    return e / e.sum()


# ---------------------------------------------------------------------- scipy
def ce_objective(u: np.ndarray, p: np.ndarray, weights: np.ndarray, layout: PackedLayout) -> tuple[float, np.ndarray]:
    """``J(softmax(u))`` and its gradient in ``u``: ``sum_{i: l in L_i} w_i (softmax_{L_i}(u)_l - p_il)``."""
    g = u[layout.class_index]
    ti = layout.teacher_index
    top = np.maximum.reduceat(g, layout.offsets[:-1])
    e = np.exp(g - top[ti])
    sums = layout.segment_sum(e)
    lse = np.log(sums) + top
    wt = weights[ti]
    value = float(weights @ lse - (wt * p * g).sum())
    grad = layout.scatter(wt * (e / sums[ti] - p))
    return value, grad


@dataclass
class PeerResult:
    """One sample's answer: ``q`` ``(K,)``, the iterations the peer reports, whether it says it converged."""

    q: np.ndarray
    iterations: int
    converged: bool


def scipy_ce(
    p: np.ndarray, weights: np.ndarray, layout: PackedLayout, tol: float = 1e-9, max_iter: int = 15000
) -> PeerResult:
    """Solve one sample's ``ce`` problem with ``scipy.optimize.minimize(method="L-BFGS-B")``.

    Starts from the `sd` estimate (as the uhc_fast solvers do); ``gtol = tol * sum(w)`` makes
    scipy's stopping test the KKT residual; ``ftol = 0`` so it does not stop on a flat objective first.
    """
    from scipy.optimize import minimize

    n = layout.scatter(weights[layout.teacher_index] * p)
    u0 = np.log(np.maximum(n / n.sum(), 1e-300))
    res = minimize(
        ce_objective,
        u0,
        args=(p, weights, layout),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": tol * float(weights.sum()), "ftol": 0.0, "maxiter": max_iter, "maxfun": 2 * max_iter},
    )
    return PeerResult(_softmax(res.x), int(res.nit), bool(res.success))


# ---------------------------------------------------------------------- choix
def choix_data(p: np.ndarray, weights: np.ndarray, layout: PackedLayout, scale: float) -> list[tuple[int, list[int]]]:
    """Top-1 records for one sample: ``round(scale * w_i * p_il)`` copies of ``(l, L_i minus l)``."""
    counts = np.rint(scale * weights[layout.teacher_index] * p).astype(np.int64)
    data = []
    for i in range(layout.num_teachers):
        members = layout.class_index[layout.offsets[i] : layout.offsets[i + 1]]
        for j, winner in enumerate(members):
            c = int(counts[layout.offsets[i] + j])
            if c:
                losers = np.delete(members, j).tolist()
                data.extend([(int(winner), losers)] * c)
    return data


CHOIX_SOLVERS = ("ilsr", "mm", "lsr")


def choix_ce(
    data: list[tuple[int, list[int]]],
    num_classes: int,
    solver: str = "ilsr",
    alpha: float = 1e-9,
    tol: float = 1e-8,
    max_iter: int = 100,
) -> PeerResult:
    """Fit choix's Luce model to top-1 ``data`` (from :func:`choix_data`) and return ``q = softmax(params)``.

    ``solver``: ``"ilsr"`` (iterative Luce spectral ranking, the maximum likelihood: choix's
    ``ilsr_top1`` loop, written out here so the iterations are counted and the last iterate kept
    when ``max_iter`` runs out), ``"mm"`` (Hunter's MM, ``choix.mm_top1``; no iteration count) or
    ``"lsr"`` (one spectral step: an approximation). ``tol`` and ``max_iter`` default to choix's own
    for ``ilsr_top1`` (L1 change of the parameters); ``alpha`` is choix's regulariser, tiny, needed
    when a class receives no count.
    """
    import choix

    if solver == "ilsr":
        params = None
        for it in range(1, max_iter + 1):
            new = choix.lsr_top1(num_classes, data, alpha=alpha, initial_params=params)
            done = params is not None and np.abs(new - params).sum() <= tol
            params = new
            if done:
                return PeerResult(_softmax(params), it, True)
        return PeerResult(_softmax(params), max_iter, False)
    if solver == "mm":
        try:
            params = choix.mm_top1(num_classes, data, alpha=alpha, tol=tol, max_iter=max_iter * 100)
        except RuntimeError:  # choix raises when it hits max_iter
            return PeerResult(np.full(num_classes, np.nan), max_iter * 100, False)
        return PeerResult(_softmax(params), -1, True)
    if solver == "lsr":
        return PeerResult(_softmax(choix.lsr_top1(num_classes, data, alpha=alpha)), 1, True)
    raise ValueError(f"solver={solver!r}: expected one of {CHOIX_SOLVERS}")
