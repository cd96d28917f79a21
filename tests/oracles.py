"""Independent float64 oracles for ``uhc_fast.estimate``, written from the mathematics alone.

Everything here is plain numpy/scipy and shares no code with the library (nothing below imports
``uhc_fast``): each oracle solves the formula in its docstring, as stated in ``../shared/uhc-math.md``,
by a different route from the library's solvers where there is a choice (primal Newton in ``u``
for ``ce`` where the library works in the N-dimensional dual; an explicitly stacked design matrix
and ``numpy.linalg.lstsq`` for ``mf-lf``; L-BFGS-B and ``scipy.optimize.least_squares`` for the
bilinear ``mf-p`` and ``mf-lu``).

Conventions shared with the public API (README, ``estimate``'s docstring), re-derived here:

- teacher ``i`` covers ``sets[i]``; its outputs are ``(B, |L_i|)`` with columns in that order;
- probability-space methods (``sd``, ``ce``, ``mf-p``) see each row renormalised to sum 1, or, at a
  temperature ``T != 1`` (or for logit inputs), ``softmax(z / T)`` with ``z = log(max(p, eps))``;
- logit-space methods (``mf-lf``, ``mf-lu``) see ``z / T`` with ``z`` the logits, or
  ``log(max(p, eps))`` for probability inputs;
- ``alpha > 0`` appends a pseudo-teacher over every covered class with weight ``alpha`` and a uniform
  output (``1/k`` as a probability, ``0`` as a logit); ``alpha=None`` means 0 on a connected
  class-overlap graph and :data:`DEFAULT_DISCONNECTED_ALPHA` on a disconnected one;
- classes no teacher covers get exactly zero mass.

The problem generators at the bottom are deterministic given a seed and cover the hard families:
tiny-mass single-class bridges, tiny masses in general, extreme teacher weights, one teacher,
two-class and one-class teachers, disconnected overlap graphs (explicit alpha), declared but
uncovered classes, consistent and noisy (log-normal) teachers, probability and logit inputs,
temperatures and random class subsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, sparse

DEFAULT_DISCONNECTED_ALPHA = 0.01
DEFAULT_EPS = 1e-12


class OracleError(AssertionError):
    """An oracle could not certify its own answer (it is then not an answer to compare against)."""


# ---------------------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """One ``estimate`` call's worth of teacher outputs, in float64, with its options.

    ``truth`` is the ``(B, K)`` soft labels the outputs were generated from, when they are
    consistent with the UHC relation and the method's answer is known to be it (else None).
    ``scales`` is the per-teacher logit scale ``v`` of ``mf-lu``-style outputs, when known.
    """

    sets: list[list[int]]
    num_classes: int
    outputs: list[np.ndarray]
    inputs: str = "probs"
    weights: np.ndarray | None = None
    temperature: float = 1.0
    alpha: float | None = None
    eps: float = DEFAULT_EPS
    truth: np.ndarray | None = None
    scales: np.ndarray | None = None
    family: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.outputs[0].shape[0])

    @property
    def num_teachers(self) -> int:
        return len(self.sets)

    def options(self) -> dict:
        """Keyword arguments of ``uhc_fast.estimate`` describing this problem."""
        return {
            "inputs": self.inputs,
            "num_classes": self.num_classes,
            "weights": None if self.weights is None else [float(w) for w in self.weights],
            "temperature": self.temperature,
            "alpha": self.alpha,
            "eps": self.eps,
        }

    def __repr__(self) -> str:  # hypothesis prints falsifying examples with this
        return (
            f"Problem(family={self.family!r}, sets={self.sets}, K={self.num_classes}, B={self.batch}, "
            f"inputs={self.inputs!r}, T={self.temperature}, alpha={self.alpha}, eps={self.eps}, "
            f"weights={None if self.weights is None else np.array2string(self.weights, precision=4)}, "
            f"consistent={self.truth is not None}, notes={self.notes})"
        )


# ---------------------------------------------------------------------------------------- graph
def components(sets, num_classes: int) -> list[list[int]]:
    """Connected components of the class-overlap graph (classes linked when a teacher covers both),
    over covered classes only."""
    parent = list(range(num_classes))

    def root(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for s in sets:
        s = list(s)
        for c in s[1:]:
            a, b = root(int(s[0])), root(int(c))
            if a != b:
                parent[b] = a
    covered = sorted({int(c) for s in sets for c in s})
    groups: dict[int, list[int]] = {}
    for c in covered:
        groups.setdefault(root(c), []).append(c)
    return list(groups.values())


def is_connected(sets, num_classes: int) -> bool:
    return len(components(sets, num_classes)) <= 1


def scale_components(sets, min_shared: int = 2) -> list[list[int]]:
    """Components of the teacher graph linking teachers that share at least ``min_shared`` classes
    (what fixes the ratio of two teachers' logit scales in ``mf-lu``)."""
    n = len(sets)
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(n):
        for j in range(i + 1, n):
            if len(set(sets[i]) & set(sets[j])) >= min_shared:
                a, b = root(i), root(j)
                if a != b:
                    parent[b] = a
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def covered_classes(sets) -> list[int]:
    return sorted({int(c) for s in sets for c in s})


def resolve_alpha(problem: Problem) -> float:
    """The prior weight the math prescribes: as given, else 0 (connected) or 0.01 (disconnected)."""
    if problem.alpha is not None:
        return float(problem.alpha)
    return 0.0 if is_connected(problem.sets, problem.num_classes) else DEFAULT_DISCONNECTED_ALPHA


# ---------------------------------------------------------------------------------------- inputs
def _softmax_rows(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def as_probabilities(x: np.ndarray, inputs: str, temperature: float, eps: float) -> np.ndarray:
    """One teacher's ``(B, |L_i|)`` outputs as the probabilities ``sd``/``ce``/``mf-p`` see:
    ``p / sum(p)`` (probabilities at T = 1), else ``softmax(z / T)`` with ``z`` the logits or
    ``log(max(p, eps))``."""
    x = np.asarray(x, dtype=np.float64)
    if inputs == "probs" and temperature == 1.0:
        return x / x.sum(axis=1, keepdims=True)
    return _softmax_rows(as_logits(x, inputs, temperature, eps))


def as_logits(x: np.ndarray, inputs: str, temperature: float, eps: float) -> np.ndarray:
    """One teacher's outputs as the logits ``mf-lf``/``mf-lu`` see: ``z / T``, with
    ``z = log(max(p, eps))`` for probability inputs."""
    x = np.asarray(x, dtype=np.float64)
    z = np.log(np.maximum(x, eps)) if inputs == "probs" else x
    return z / temperature


def teacher_values(problem: Problem, outputs=None, kind: str = "probs"):
    """``(sets, values, weights)`` the method of value ``kind`` works on, the alpha prior appended.

    ``values[i]`` is ``(B, |L_i|)`` float64; ``outputs`` (default ``problem.outputs``) lets a test pass
    the float64 image of exactly what the library was given (for instance float32-rounded).
    """
    outputs = problem.outputs if outputs is None else outputs
    convert = as_probabilities if kind == "probs" else as_logits
    values = [convert(x, problem.inputs, problem.temperature, problem.eps) for x in outputs]
    sets = [np.asarray(s, dtype=np.int64) for s in problem.sets]
    weights = np.ones(len(sets)) if problem.weights is None else np.asarray(problem.weights, dtype=np.float64)
    alpha = resolve_alpha(problem)
    if alpha > 0:
        prior = np.asarray(covered_classes(problem.sets), dtype=np.int64)
        fill = 1.0 / prior.size if kind == "probs" else 0.0
        sets = [*sets, prior]
        values = [*values, np.full((problem.batch, prior.size), fill)]
        weights = np.append(weights, alpha)
    return sets, values, weights


# ---------------------------------------------------------------------------------------- sd
def oracle_sd(problem: Problem, outputs=None) -> np.ndarray:
    """``sd``: ``q_l`` proportional to ``sum_{i: l in L_i} w_i p_il`` (zero-padded weighted average)."""
    sets, probs, weights = teacher_values(problem, outputs, "probs")
    total = np.zeros((problem.batch, problem.num_classes))
    for s, p, w in zip(sets, probs, weights):
        for col, c in enumerate(s):
            total[:, c] += w * p[:, col]
    return total / total.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------- ce
def _expm1_minus_identity(y: np.ndarray) -> np.ndarray:
    """``exp(y) - 1 - y`` to full relative precision (series below |y| = 1e-2)."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.expm1(y) - y
    small = np.abs(y) < 1e-2
    ys = y[small]
    out[small] = ys * ys * (1 / 2 + ys * (1 / 6 + ys * (1 / 24 + ys * (1 / 120 + ys * (1 / 720 + ys / 5040)))))
    return out


def _log1p_minus_identity(x: float) -> float:
    """``log(1 + x) - x`` to full relative precision (series below |x| = 1e-2)."""
    if abs(x) < 1e-2:
        return x * x * (-1 / 2 + x * (1 / 3 + x * (-1 / 4 + x * (1 / 5 + x * (-1 / 6 + x * (1 / 7 - x / 8))))))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return float(np.log1p(x) - x)


def _ce_gradient(teachers, q: np.ndarray, m: int) -> np.ndarray:
    """``dL/du_l = sum_{i: l in L_i} w_i (q_l / S_i - p_il)``, evaluated pairwise as
    ``sum_i (w_i / S_i) sum_{k in L_i} (p_ik q_l - p_il q_k)`` (equal since ``sum_k p_ik = 1``).

    Each pair term is a difference of two products of comparable size, so a class of tiny mass
    contributes terms accurate relative to that mass, and the rounding of the O(1) terms between two
    big classes is exactly antisymmetric (it cancels over any group of classes): the direction that
    moves mass across a tiny bridge is resolved to full precision, where ``q_l / S_i - p_il``
    rounded at the scale of 1 would blur it at 1e-16 / (bridge mass).
    """
    grad = np.zeros(m)
    for idx, p, w in teachers:
        qi = q[idx]
        pair = np.outer(qi, p) - np.outer(p, qi)
        grad[idx] += w * pair.sum(axis=1) / qi.sum()
    return grad


def ce_row(sets, probs, weights, num_classes: int, *, kkt_tol: float = 1e-10, max_iter: int = 500):
    """``ce`` for one sample, by damped Newton on ``u`` (``q = softmax(u)``).

    Minimises the convex ``L(u) = sum_i w_i [logsumexp_{k in L_i} u_k - sum_{l in L_i} p_il u_l]``
    (each ``p_i`` sums to 1), whose minimiser ``q = softmax(u)`` maximises
    ``sum_i w_i sum_{l in L_i} p_il log(q_l / S_i(q))``. Classes with no evidence
    (``n_l = sum_{i: l in L_i} w_i p_il = 0``) have ``q_l = 0`` (``u_l -> -inf``) and are removed first;
    uncovered classes get 0. The Hessian is exact, ``sum_i w_i (diag(s_i) - s_i s_i^T)`` with
    ``s_i = softmax_{L_i}(u)``; the gauge is fixed by holding ``u`` at the class of largest evidence,
    and the reduced system is Jacobi-scaled before the solve. The gradient is evaluated pairwise
    (:func:`_ce_gradient`) so that tiny-mass bridges are resolved to full precision. The line search
    is Armijo on the change of ``L`` computed without cancellation (``log1p``/``expm1`` of the step,
    second-order terms by series), so that it stays meaningful down to steps of 1e-14. Iterates
    until the Newton step is below 1e-14 (relative to ``max |u|``, at least 1) in every coordinate.

    Certificates (else :class:`OracleError`): the last Newton step is below 1e-10 in every coordinate,
    and the relative KKT residual ``max_l |q_l sum_{i: l in L_i} w_i / S_i(q) / n_l - 1| <= kkt_tol``
    over classes with ``n_l > 0``.

    Returns ``(q over num_classes, relative KKT residual, Newton steps)``.
    """
    evidence = np.zeros(num_classes)
    for s, p, w in zip(sets, probs, weights):
        np.add.at(evidence, s, w * p)
    active = np.flatnonzero(evidence > 0)
    q_full = np.zeros(num_classes)
    if active.size == 1:
        q_full[active] = 1.0
        return q_full, 0.0, 0
    position = -np.ones(num_classes, dtype=np.int64)
    position[active] = np.arange(active.size)
    teachers = []
    for s, p, w in zip(sets, probs, weights):
        keep = evidence[s] > 0  # a dropped class has p_il = 0 for every teacher covering it
        teachers.append((position[s[keep]], p[keep] / p[keep].sum(), float(w)))
    if not is_connected([list(idx) for idx, _, _ in teachers], active.size):
        raise OracleError("ce oracle: the classes with evidence are not connected (no unique maximum likelihood)")
    n = evidence[active]
    m = active.size
    cover = np.zeros(m)
    for idx, _, w in teachers:
        cover[idx] += w
    u = np.log(n) - np.log(cover)
    ref = int(np.argmax(n))
    free = np.arange(m) != ref

    steps, last_step = 0, np.inf
    while steps < max_iter:
        steps += 1
        q = np.exp(u - u.max())
        grad = _ce_gradient(teachers, q, m)
        hess = np.zeros((m, m))
        softmaxes = []
        for idx, _, w in teachers:
            s = q[idx] / q[idx].sum()
            hess[np.ix_(idx, idx)] += w * (np.diag(s) - np.outer(s, s))
            softmaxes.append(s)
        h = hess[np.ix_(free, free)]
        scale = 1.0 / np.sqrt(np.diag(h))
        try:
            y = np.linalg.solve(h * scale[:, None] * scale[None, :], -grad[free] * scale)
        except np.linalg.LinAlgError as err:  # pragma: no cover - connected => positive definite
            raise OracleError(f"ce oracle: singular reduced Hessian ({err})") from err
        direction = np.zeros(m)
        direction[free] = y * scale
        slope = float(grad @ direction)
        last_step = float(np.abs(direction).max())
        if last_step <= 1e-14 * max(1.0, float(np.abs(u).max())) or slope >= 0:
            if slope < 0:
                u = u + direction
            break
        t = 1.0
        for _ in range(80):
            change = t * slope
            for (idx, _, w), s in zip(teachers, softmaxes):
                ty = t * direction[idx]
                with np.errstate(over="ignore", invalid="ignore"):
                    x = float(s @ np.expm1(ty))
                change += w * (_log1p_minus_identity(x) + float(s @ _expm1_minus_identity(ty)))
            if np.isfinite(change) and change <= 1e-4 * t * slope:
                break
            t /= 2
        else:
            break  # no decrease representable: the certificates below decide
        u = u + t * direction

    q = np.exp(u - u.max())
    q /= q.sum()
    kkt = float(np.abs(_ce_gradient(teachers, q, m) / n).max())
    if not last_step <= 1e-10:
        raise OracleError(f"ce oracle: last Newton step {last_step:.3g} after {steps} steps")
    if not kkt <= kkt_tol:
        raise OracleError(f"ce oracle: relative KKT residual {kkt:.3g} > {kkt_tol:g} after {steps} Newton steps")
    q_full[active] = q
    return q_full, kkt, steps


def oracle_ce(problem: Problem, outputs=None, **kwargs) -> np.ndarray:
    """``ce`` (maximum likelihood of the UHC relation) for every row; see :func:`ce_row`."""
    sets, probs, weights = teacher_values(problem, outputs, "probs")
    rows = [
        ce_row(sets, [p[b] for p in probs], weights, problem.num_classes, **kwargs)[0] for b in range(problem.batch)
    ]
    return np.array(rows).reshape(problem.batch, problem.num_classes)


def ce_relative_kkt(problem: Problem, q: np.ndarray, outputs=None) -> np.ndarray:
    """Per row, ``max_l |q_l sum_{i: l in L_i} w_i / S_i(q) / n_l - 1|`` over classes with ``n_l > 0``."""
    sets, probs, weights = teacher_values(problem, outputs, "probs")
    out = np.zeros(problem.batch)
    for b in range(problem.batch):
        n = np.zeros(problem.num_classes)
        d = np.zeros(problem.num_classes)
        for s, p, w in zip(sets, probs, weights):
            np.add.at(n, s, w * p[b])
            d[s] += w / q[b, s].sum()
        has = n > 0
        out[b] = np.abs(q[b, has] * d[has] / n[has] - 1).max()
    return out


# ---------------------------------------------------------------------------------------- mf-lf
def oracle_mf_lf(problem: Problem, outputs=None) -> np.ndarray:
    """``mf-lf``: ``min_{u, c} sum_i w_i sum_{l in L_i} (z_il - u_l - c_i)^2``, then ``q = softmax(u)``
    over the covered classes (0 elsewhere).

    Solved with ``numpy.linalg.lstsq`` on the explicitly stacked design matrix: one row per
    ``(i, l)`` with a 1 in the column of ``u_l`` and in the column of ``c_i``, the row and its
    right-hand side ``z_il`` scaled by ``sqrt(w_i)``; every sample is one column of the right-hand
    side. The common shift of ``u`` against ``c`` is the design's only null direction (on a connected
    overlap graph) and softmax ignores it; lstsq returns the minimum-norm solution.
    """
    sets, logits, weights = teacher_values(problem, outputs, "logits")
    covered = covered_classes(sets)
    column = {c: j for j, c in enumerate(covered)}
    k, n = len(covered), len(sets)
    rows = sum(len(s) for s in sets)
    design = np.zeros((rows, k + n))
    rhs = np.zeros((rows, problem.batch))
    r = 0
    for i, (s, z, w) in enumerate(zip(sets, logits, weights)):
        root = math.sqrt(w)
        for col, c in enumerate(s):
            design[r, column[int(c)]] = root
            design[r, k + i] = root
            rhs[r] = root * z[:, col]
            r += 1
    solution = np.linalg.lstsq(design, rhs, rcond=None)[0]
    u = solution[:k].T  # (B, k)
    q = np.zeros((problem.batch, problem.num_classes))
    q[:, covered] = _softmax_rows(u)
    return q


# ---------------------------------------------------------------------------------------- dense rows
def dense_row(sets, values, weights, b: int, num_classes: int):
    """Row ``b`` as dense ``(N, K)`` values (zero-padded), mask and the weights."""
    n = len(sets)
    values_dense = np.zeros((n, num_classes))
    mask = np.zeros((n, num_classes), dtype=bool)
    for i, (s, x) in enumerate(zip(sets, values)):
        values_dense[i, s] = x[b]
        mask[i, s] = True
    return values_dense, mask, np.asarray(weights, dtype=np.float64)


# ---------------------------------------------------------------------------------------- mf-p
def mf_p_objective(p: np.ndarray, mask: np.ndarray, w: np.ndarray, q: np.ndarray, v: np.ndarray) -> float:
    """``f(q, v) = sum_i w_i sum_{l in L_i} (p_il - v_i q_l)^2`` (dense row from :func:`dense_row`)."""
    r = np.where(mask, p - v[:, None] * q[None, :], 0.0)
    return float((w[:, None] * r * r).sum())


def mf_p_q_of_v(p, mask, w, v) -> np.ndarray:
    """For fixed ``v``, the optimal ``q_l = A_l / B_l`` with ``A_l = sum_{i: l in L_i} w_i v_i p_il`` and
    ``B_l = sum_{i: l in L_i} w_i v_i^2`` (unnormalised; 0 where ``B_l = 0``)."""
    a = (w * v) @ np.where(mask, p, 0.0)
    b = (w * v * v) @ mask
    return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)


def mf_p_v_of_q(p, mask, q) -> np.ndarray:
    """For fixed ``q``, each teacher's optimal ``v_i = sum_{l in L_i} p_il q_l / sum_{l in L_i} q_l^2`` (>= 0)."""
    qq = np.where(mask, q[None, :], 0.0)
    num = (np.where(mask, p, 0.0) * qq).sum(axis=1)
    den = (qq * qq).sum(axis=1)
    return np.where(den > 0, np.maximum(num, 0) / np.where(den > 0, den, 1.0), 0.0)


def mf_p_polish(p, mask, w, v0, *, max_iter: int = 20000):
    """Local minimisation of ``mf-p`` from ``v0``, in float64.

    For fixed ``v`` the optimal q is :func:`mf_p_q_of_v`, which leaves
    ``F(v) = sum_i w_i sum_{L_i} p_il^2 - sum_l A_l^2 / B_l`` with gradient
    ``dF/dv_i = -2 w_i sum_{l in L_i} q_l (p_il - v_i q_l)``; minimised over ``v >= 0`` with
    ``scipy.optimize.minimize(method="L-BFGS-B")``. Returns ``(q normalised to sum 1, v rescaled to
    match, f(q, v))``.
    """
    pm = np.where(mask, p, 0.0)
    const = float((w[:, None] * pm * pm).sum())

    def fun(v):
        a = (w * v) @ pm
        b = (w * v * v) @ mask
        ok = b > 0
        q = np.where(ok, a / np.where(ok, b, 1.0), 0.0)
        value = const - float((a[ok] ** 2 / b[ok]).sum())
        grad = -2 * w * ((pm * q[None, :]).sum(axis=1) - v * (mask * (q * q)[None, :]).sum(axis=1))
        return value, grad

    v0 = np.maximum(np.asarray(v0, dtype=np.float64), 1e-12)
    result = optimize.minimize(
        fun,
        v0,
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, None)] * v0.size,
        options={"maxiter": max_iter, "maxfun": 4 * max_iter, "ftol": 1e-16, "gtol": 1e-14, "maxcor": 50},
    )
    v = result.x
    q = mf_p_q_of_v(p, mask, w, v)
    total = q.sum()
    q, v = q / total, v * total
    return _mf_p_gauss_newton(p, mask, w, q, v)


def _mf_p_gauss_newton(p, mask, w, q, v, *, max_steps: int = 20):
    """Gauss-Newton steps on the residuals ``sqrt(w_i) (p_il - v_i q_l)`` themselves, ``sum q = 1``
    pinned by one more row: ``F(v)`` above loses what lies below ``eps * sum w p^2`` to cancellation,
    which leaves ``q`` off by ``sqrt`` of that where a teacher of tiny weight decides it. A step is
    kept only when it stays feasible and lowers ``f``. Returns ``(q, v, f(q, v))``."""
    ii, ll = np.nonzero(mask)
    rows, num_classes = np.arange(ii.size), q.size
    root, target = np.sqrt(w[ii]), p[ii, ll]
    pin = np.sqrt(w.sum())
    f = mf_p_objective(p, mask, w, q, v)
    for _ in range(max_steps):
        jac = np.zeros((ii.size + 1, num_classes + v.size))
        jac[rows, ll] = -root * v[ii]
        jac[rows, num_classes + ii] = -root * q[ll]
        jac[-1, :num_classes] = pin
        residual = np.append(root * (target - v[ii] * q[ll]), pin * (q.sum() - 1))
        step = np.linalg.lstsq(jac, -residual, rcond=None)[0]
        q_new, v_new = q + step[:num_classes], v + step[num_classes:]
        if (q_new < 0).any() or (v_new < 0).any():
            break
        f_new = mf_p_objective(p, mask, w, q_new / q_new.sum(), v_new * q_new.sum())
        if not f_new < f:
            break
        q, v, f = q_new / q_new.sum(), v_new * q_new.sum(), f_new
    return q, v, f


def oracle_mf_p_row(p, mask, w, starts):
    """``mf-p`` for one dense row: the best of :func:`mf_p_polish` from each start ``v``.

    Minimises ``f(q, v) = sum_i w_i sum_{l in L_i} (p_il - v_i q_l)^2`` over the simplex and ``v >= 0``.
    """
    best = None
    for v0 in starts:
        candidate = mf_p_polish(p, mask, w, v0)
        if best is None or candidate[2] < best[2]:
            best = candidate
    return best


def oracle_mf_p(problem: Problem, outputs=None, extra_starts=None) -> np.ndarray:
    """``mf-p`` for every row, from the start ``v_i = 1 / S_i(q_sd)``, ``v = 1``, the truth's
    ``1 / S_i(q)`` when known, and ``extra_starts[b]`` (see :func:`oracle_mf_p_row`)."""
    sets, probs, weights = teacher_values(problem, outputs, "probs")
    sd = oracle_sd(problem, outputs)
    out = np.zeros((problem.batch, problem.num_classes))
    for b in range(problem.batch):
        p, mask, w = dense_row(sets, probs, weights, b, problem.num_classes)
        starts = [mf_p_v_of_q(p, mask, sd[b]), np.ones(len(sets))]
        if problem.truth is not None:
            starts.append(mf_p_v_of_q(p, mask, problem.truth[b]))
        if extra_starts is not None:
            starts.extend(extra_starts[b])
        out[b] = oracle_mf_p_row(p, mask, w, starts)[0]
    return out


def mf_p_check_row(problem: Problem, q_lib: np.ndarray, b: int, outputs=None):
    """Polish the library's row ``b`` answer with the oracle: ``(f at the library's q with its best v,
    f after polishing, polished q)``."""
    sets, probs, weights = teacher_values(problem, outputs, "probs")
    p, mask, w = dense_row(sets, probs, weights, b, problem.num_classes)
    q = np.asarray(q_lib, dtype=np.float64)
    v = mf_p_v_of_q(p, mask, q)
    f_lib = mf_p_objective(p, mask, w, q, v)
    q_pol, _, f_pol = mf_p_polish(p, mask, w, v)
    return f_lib, f_pol, q_pol


# ---------------------------------------------------------------------------------------- mf-lu
class _LogitScaleFit:
    """Variable projection for ``mf-lu`` on one dense row: for fixed ``v``, the ``(u, c)`` minimising
    ``sum_i w_i sum_{l in L_i} (y_il - v_i u_l - c_i)^2`` exactly (``u`` eliminated in closed form,
    ``c`` by lstsq), for one or several right-hand sides ``y``."""

    def __init__(self, z, mask, w):
        self.mask, self.w = mask, w
        self.ii, self.ll = np.nonzero(mask)
        self.y = z[self.ii, self.ll]
        self.root = np.sqrt(w[self.ii])
        self.num_teachers, self.num_classes = mask.shape
        nnz = self.ii.size
        self.teacher_indicator = sparse.csr_matrix(
            (np.ones(nnz), (np.arange(nnz), self.ii)), shape=(nnz, self.num_teachers)
        )

    def solve(self, v, y):
        """Weighted residuals ``sqrt(w_i) (y_il - v_i u_l - c_i)``, and ``u``, ``c`` (columns of ``y``)."""
        ii, ll = self.ii, self.ll
        d = (self.w * v * v) @ self.mask
        safe = np.where(d > 0, d, 1.0)
        coef = np.where(d[ll] > 0, self.w[ii] * v[ii] / safe[ll], 0.0)
        # u = S y - S I_c c, with S[l, (i, l)] = w_i v_i / D_l
        s = sparse.csr_matrix((coef, (ll, np.arange(ii.size))), shape=(self.num_classes, ii.size))
        vi = v[ii][:, None]
        r0 = y - vi * (s @ y)[ll]
        g = self.teacher_indicator.toarray() - vi * (s @ self.teacher_indicator).toarray()[ll]
        root = self.root[:, None]
        c = np.linalg.lstsq(root * g, root * r0, rcond=None)[0]
        u = s @ (y - c[ii])
        return root * (r0 - g @ c), u, c

    def residual(self, v):
        return self.solve(v, self.y[:, None])[0][:, 0]

    def jacobian(self, v):
        # Kaufman's variable-projection Jacobian: d r / d v_j ~ -P_perp (sqrt(w) [i = j] u_l); its
        # product with the residual is the exact gradient (envelope theorem)
        _, u, _ = self.solve(v, self.y[:, None])
        e = np.zeros((self.ii.size, self.num_teachers))
        e[np.arange(self.ii.size), self.ii] = u[self.ll, 0]
        return -self.solve(v, e)[0]


def mf_lu_objective(z, mask, w, u, c, v) -> float:
    """``sum_i w_i sum_{l in L_i} (z_il - v_i u_l - c_i)^2`` on a dense row."""
    r = np.where(mask, z - v[:, None] * u[None, :] - c[:, None], 0.0)
    return float((w[:, None] * r * r).sum())


def mf_lu_polish(z, mask, w, v0):
    """``mf-lu`` from ``v0``: ``scipy.optimize.least_squares`` (trf, bounds ``v >= 0``) on the
    variable-projection residual of :class:`_LogitScaleFit`. Returns ``(q, u, c, v, objective)``
    with the gauge fixed by the weighted mean ``sum_i w_i v_i / sum_i w_i = 1`` (u rescaled to match)
    and ``q = softmax(u)`` over the covered classes."""
    fit = _LogitScaleFit(z, mask, w)
    v0 = np.maximum(np.asarray(v0, dtype=np.float64), 1e-10)
    result = optimize.least_squares(
        fit.residual,
        v0,
        jac=fit.jacobian,
        bounds=(0.0, np.inf),
        method="trf",
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
        max_nfev=2000,
    )
    v = result.x
    _, u, c = fit.solve(v, fit.y[:, None])
    u, c = u[:, 0], c[:, 0]
    scale = float(w @ v) / float(w.sum())
    if not scale > 0:
        raise OracleError("mf-lu oracle: every teacher scale is 0")
    v, u = v / scale, u * scale
    covered = mask.any(axis=0)
    q = np.zeros(mask.shape[1])
    q[covered] = _softmax_rows(u[covered][None, :])[0]
    return q, u, c, v, mf_lu_objective(z, mask, w, u, c, v)


def oracle_mf_lu_row(z, mask, w, starts):
    """``mf-lu`` for one dense row: ``min_{u, c, v >= 0} sum_i w_i sum_{l in L_i} (z_il - v_i u_l - c_i)^2``
    normalised to ``sum_i w_i v_i / sum_i w_i = 1``; the best of :func:`mf_lu_polish` from each start."""
    best = None
    for v0 in starts:
        candidate = mf_lu_polish(z, mask, w, v0)
        if best is None or candidate[4] < best[4]:
            best = candidate
    return best


def oracle_mf_lu(problem: Problem, outputs=None) -> np.ndarray:
    """``mf-lu`` for every row, from ``v = 1`` and from the true scales when known."""
    sets, logits, weights = teacher_values(problem, outputs, "logits")
    out = np.zeros((problem.batch, problem.num_classes))
    for b in range(problem.batch):
        z, mask, w = dense_row(sets, logits, weights, b, problem.num_classes)
        starts = [np.ones(len(sets))]
        if problem.scales is not None:
            truth = np.ones(len(sets))
            truth[: problem.num_teachers] = problem.scales[b]
            starts.append(truth)
        out[b] = oracle_mf_lu_row(z, mask, w, starts)[0]
    return out


def mf_lu_start_from_q(z, mask, q):
    """The library's answer as a point of the ``mf-lu`` problem: ``u = log q`` (shift free) and each
    teacher's least-squares ``v_i >= 0``, ``c_i`` for that ``u``."""
    covered = mask.any(axis=0)
    u = np.zeros(mask.shape[1])
    u[covered] = np.log(np.maximum(q[covered], np.finfo(np.float64).tiny))
    v = np.zeros(mask.shape[0])
    c = np.zeros(mask.shape[0])
    for i in range(mask.shape[0]):
        ui, zi = u[mask[i]], z[i, mask[i]]
        du = ui - ui.mean()
        var = float(du @ du)
        v[i] = max(0.0, float(du @ (zi - zi.mean())) / var) if var > 0 else 0.0
        c[i] = float((zi - v[i] * ui).mean())
    return u, c, v


def mf_lu_check_row(problem: Problem, q_lib: np.ndarray, b: int, outputs=None):
    """Polish the library's row ``b`` answer with the oracle: ``(objective at the library's q with its
    best c, v; objective after polishing; polished q)``."""
    sets, logits, weights = teacher_values(problem, outputs, "logits")
    z, mask, w = dense_row(sets, logits, weights, b, problem.num_classes)
    u, c, v = mf_lu_start_from_q(z, mask, np.asarray(q_lib, dtype=np.float64))
    f_lib = mf_lu_objective(z, mask, w, u, c, v)
    q_pol, _, _, _, f_pol = mf_lu_polish(z, mask, w, v)
    return f_lib, f_pol, q_pol


ORACLES = {"sd": oracle_sd, "ce": oracle_ce, "mf-lf": oracle_mf_lf, "mf-p": oracle_mf_p, "mf-lu": oracle_mf_lu}


# ---------------------------------------------------------------------------------------- generators
FAMILIES = (
    "random_subsets",
    "tiny_bridge",
    "tiny_mass",
    "one_teacher",
    "two_class",
    "one_class",
    "disconnected",
    "extreme_weights",
    "uncovered",
)
# families on which the mf-lu scales are identifiable (teachers linked through >= 3 shared classes)
LU_FAMILIES = ("random_subsets", "tiny_mass", "one_teacher", "extreme_weights", "uncovered")


def random_soft_labels(rng: np.random.Generator, batch: int, num_classes: int, sharpness: float) -> np.ndarray:
    """``softmax(sharpness * g)`` per row, g standard normal."""
    return _softmax_rows(sharpness * rng.standard_normal((batch, num_classes)))


def random_subsets(
    rng: np.random.Generator,
    num_classes: int,
    num_teachers: int,
    *,
    min_size: int = 2,
    max_size: int | None = None,
    link: int = 1,
) -> list[list[int]]:
    """N random class subsets (as in the paper) covering all K classes, each of size in
    ``[min_size, max_size]``, linked so that the teacher graph (edges between teachers sharing at
    least ``link`` classes) is connected, which for ``link >= 1`` makes the overlap graph connected."""
    max_size = num_classes if max_size is None else min(max_size, num_classes)
    min_size = min(min_size, max_size)
    sets = [
        set(rng.choice(num_classes, size=int(rng.integers(min_size, max_size + 1)), replace=False).tolist())
        for _ in range(num_teachers)
    ]
    for c in range(num_classes):
        if not any(c in s for s in sets):
            sets[int(rng.integers(num_teachers))].add(c)
    link = min(link, num_classes)
    while True:
        groups = scale_components([sorted(s) for s in sets], link)
        if len(groups) <= 1:
            break
        i, j = int(rng.choice(groups[0])), int(rng.choice(groups[1]))
        need = link - len(sets[i] & sets[j])
        spare = sorted(sets[j] - sets[i])
        if len(spare) >= need:  # teacher i takes some of teacher j's classes
            sets[i].update(rng.choice(spare, size=need, replace=False).tolist())
        else:  # both take classes until they share `link`
            sets[i].update(spare)
            outside = sorted(set(range(num_classes)) - sets[j])
            shared = rng.choice(outside, size=need - len(spare), replace=False).tolist()
            sets[i].update(shared)
            sets[j].update(shared)
    return [[int(c) for c in rng.permutation(sorted(s))] for s in sets]


def emit(
    rng: np.random.Generator,
    q: np.ndarray,
    sets,
    *,
    inputs: str,
    noise: float,
    temperature: float,
    scales: np.ndarray | None = None,
    shift: float = 3.0,
) -> list[np.ndarray]:
    """Teacher outputs from soft labels ``q`` (B, K) through the UHC relation, at ``temperature``.

    Probabilities: ``p_i`` proportional to ``(q_{L_i} e^{noise g})^T`` (so that the library's
    ``softmax(log p / T)`` is ``q_{L_i} / S_i`` up to the noise). Logits:
    ``z_i = T (v_i log q_{L_i} + c_i + noise g)`` with a random per-row shift ``c_i`` and the
    per-teacher scales ``v`` (default 1; given as ``(B, N)`` or ``(N,)``).
    """
    out = []
    for i, s in enumerate(sets):
        log_q = np.log(q[:, s])
        g = noise * rng.standard_normal(log_q.shape)
        if inputs == "probs":
            z = temperature * (log_q + g)
            out.append(_softmax_rows(z))
        else:
            v = 1.0 if scales is None else np.broadcast_to(scales, (q.shape[0], len(sets)))[:, i : i + 1]
            c = shift * rng.standard_normal((q.shape[0], 1))
            out.append(temperature * (v * log_q + c + g))
    return out


def set_tiny(rng: np.random.Generator, q: np.ndarray, classes, lo: float = 1e-10, hi: float = 1e-5) -> np.ndarray:
    """Give ``classes`` masses log-uniform in ``[lo, hi]`` per row, rescaling the rest to sum 1."""
    q = q.copy()
    tiny = np.exp(rng.uniform(np.log(lo), np.log(hi), size=(q.shape[0], len(classes))))
    rest = np.ones(q.shape[1], dtype=bool)
    rest[list(classes)] = False
    q[:, rest] *= (1 - tiny.sum(axis=1, keepdims=True)) / q[:, rest].sum(axis=1, keepdims=True)
    q[:, list(classes)] = tiny
    return q


def make_problem(
    family: str,
    seed: int,
    *,
    batch: int = 4,
    noise: float = 0.0,
    inputs: str = "probs",
    temperature: float = 1.0,
    weighted: bool = False,
    sharpness: float | None = None,
    max_classes: int = 12,
    max_teachers: int = 6,
) -> Problem:
    """A deterministic problem of ``family`` (see :data:`FAMILIES`) from ``seed``.

    ``noise`` is the log-normal noise level on the teachers (0: consistent, ``truth`` set where the
    method's answer is the generating q: connected graphs without prior). ``weighted`` draws
    per-teacher weights log-uniform in ``[1e-3, 1e3]`` (always for ``extreme_weights``).
    """
    rng = np.random.default_rng(seed)
    sharp = float(rng.uniform(1.0, 3.0)) if sharpness is None else sharpness
    alpha = None
    num_classes = None
    relabel = None
    tiny_classes: list[int] = []

    if family in ("random_subsets", "extreme_weights", "uncovered", "tiny_mass"):
        k = int(rng.integers(3, max_classes + 1))
        n = int(rng.integers(1, max_teachers + 1))
        sets = random_subsets(rng, k, n, link=3 if family == "tiny_mass" else 1)
        if family == "tiny_mass":
            tiny_classes = sorted(rng.choice(k, size=max(1, k // 4), replace=False).tolist())
        if family == "uncovered":
            extra = int(rng.integers(1, 4))
            relabel = rng.permutation(k + extra)[:k]
            num_classes = k + extra
    elif family == "tiny_bridge":
        # classes: bridge b, side A, side B; every teacher within A + {b} or B + {b}, at least one
        # teacher on each side covers b: b is the only link between the sides
        size_a, size_b = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        k = 1 + size_a + size_b
        side_a, side_b = list(range(1, 1 + size_a)), list(range(1 + size_a, k))
        sets = [[0, *side_a], [0, *side_b]]
        for side in (side_a, side_b):
            for _ in range(int(rng.integers(0, 2))):
                pool = [0, *side] if rng.random() < 0.5 else side
                size = int(rng.integers(1, len(pool) + 1))
                sets.append(rng.choice(pool, size=size, replace=False).tolist())
        sets = [[int(c) for c in rng.permutation(s)] for s in sets]
        tiny_classes = [0]
    elif family == "one_teacher":
        k = int(rng.integers(1, 14))
        sets = [[int(c) for c in rng.permutation(k)]]
    elif family == "two_class":
        k = int(rng.integers(2, 9))
        order = rng.permutation(k)
        sets = [[int(order[int(rng.integers(0, j))]), int(order[j])] for j in range(1, k)]  # spanning tree
        for _ in range(int(rng.integers(0, 3))):
            sets.append([int(c) for c in rng.choice(k, size=2, replace=False)])
        sets = [s if rng.random() < 0.5 else s[::-1] for s in sets]
    elif family == "one_class":
        k = int(rng.integers(2, max_classes + 1))
        sets = random_subsets(rng, k, int(rng.integers(1, max_teachers + 1)))
        for _ in range(int(rng.integers(1, 4))):
            sets.append([int(rng.integers(k))])
    elif family == "disconnected":
        parts = int(rng.integers(2, 4))
        k = int(rng.integers(parts, max_classes + 1))
        cuts = np.sort(rng.choice(np.arange(1, k), size=parts - 1, replace=False))
        groups = np.split(rng.permutation(k), cuts)
        sets = []
        for group in groups:
            local = random_subsets(rng, len(group), int(rng.integers(1, 3)), min_size=1)
            sets.extend([[int(group[c]) for c in s] for s in local])
        alpha = float(np.exp(rng.uniform(np.log(1e-3), np.log(1.0))))
    else:
        raise ValueError(f"unknown family {family!r}")

    q = random_soft_labels(rng, batch, k, sharp)
    if tiny_classes:
        q = set_tiny(rng, q, tiny_classes)
    weights = None
    if weighted or family == "extreme_weights":
        weights = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), size=len(sets)))
    outputs = emit(rng, q, sets, inputs=inputs, noise=noise, temperature=temperature)
    if relabel is not None:
        sets = [[int(relabel[c]) for c in s] for s in sets]
        full = np.zeros((batch, num_classes))
        full[:, relabel] = q
        q = full
    num_classes = k if num_classes is None else num_classes
    truth = q if noise == 0 and alpha is None else None
    min_p = min(float(x.min()) for x in outputs) if inputs == "probs" else None
    if min_p is not None and temperature != 1.0 and min_p < 10 * DEFAULT_EPS:
        truth = None  # the eps clamp of log(p) before the temperature changes the problem
    return Problem(
        sets=sets,
        num_classes=num_classes,
        outputs=outputs,
        inputs=inputs,
        weights=weights,
        temperature=temperature,
        alpha=alpha,
        truth=truth,
        family=family,
        notes={"seed": seed, "noise": noise, "min_p": min_p},
    )


def make_scaled_problem(
    seed: int,
    *,
    family: str = "random_subsets",
    batch: int = 4,
    noise: float = 0.0,
    temperature: float = 1.0,
    weighted: bool = False,
    num_classes: int | None = None,
    num_teachers: int | None = None,
    max_classes: int = 12,
    max_teachers: int = 6,
    spread: float = 1.0,
) -> Problem:
    """``mf-lu``-style logits: teachers at different temperatures, ``z_il = T (v_i log q_l + c_i + noise g)``
    with ``v_i = 1 / T_i`` log-normal (``spread``) and normalised to weighted mean 1, so that with
    ``noise = 0`` the ``mf-lu`` answer is ``q`` itself. Class sets from :data:`LU_FAMILIES`, linked
    through at least 3 shared classes."""
    if family not in LU_FAMILIES:
        raise ValueError(f"family {family!r} does not identify the mf-lu scales")
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, max_classes + 1)) if num_classes is None else num_classes
    n = int(rng.integers(1, max_teachers + 1)) if num_teachers is None else num_teachers
    if family == "one_teacher":
        n = 1
        sets = [[int(c) for c in rng.permutation(k)]]
    else:
        sets = random_subsets(rng, k, n, min_size=min(k, 3), max_size=max(3, k // 2 + 2), link=3)
    q = random_soft_labels(rng, batch, k, float(rng.uniform(1.0, 3.0)))
    if family == "tiny_mass":
        q = set_tiny(rng, q, sorted(rng.choice(k, size=max(1, k // 4), replace=False).tolist()))
    weights = None
    if weighted or family == "extreme_weights":
        weights = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), size=n))
    w = np.ones(n) if weights is None else weights
    v = np.exp(spread * rng.standard_normal((batch, n)))
    v /= (v @ w)[:, None] / w.sum()
    outputs = emit(rng, q, sets, inputs="logits", noise=noise, temperature=temperature, scales=v)
    num = k
    if family == "uncovered":
        extra = int(rng.integers(1, 4))
        relabel = rng.permutation(k + extra)[:k]
        sets = [[int(relabel[c]) for c in s] for s in sets]
        full = np.zeros((batch, k + extra))
        full[:, relabel] = q
        q, num = full, k + extra
    return Problem(
        sets=sets,
        num_classes=num,
        outputs=outputs,
        inputs="logits",
        weights=weights,
        temperature=temperature,
        truth=q if noise == 0 else None,
        scales=v,
        family=f"scaled/{family}",
        notes={"seed": seed, "noise": noise},
    )


def tiny_bridge_regression(q0: float = 7.4e-6) -> Problem:
    """The issue's case: ``sets = [[0, 3, 2], [1, 0]]``, ``q = [q0, .8249, 4.5e-4, rest]``, teachers
    ``q[s] / q[s].sum()``: class 0 (mass q0) is the only link between the two teachers."""
    q = np.array([q0, 0.8249, 4.5e-4, 0.0])
    q[3] = 1 - q.sum()
    sets = [[0, 3, 2], [1, 0]]
    outputs = [(q[s] / q[s].sum())[None, :] for s in sets]
    return Problem(sets=sets, num_classes=4, outputs=outputs, truth=q[None, :], family="regression/tiny_bridge")


def benchmark_workload(batch: int, num_classes: int, num_teachers: int, *, noise: float = 0.3, seed: int = 0):
    """A numpy re-creation of ``benchmarks.workloads.make``: overlapping windows of a shuffled class
    order (every class covered, connected), ``q = softmax(2 g)`` and teacher ``i`` outputs
    ``softmax(2 g_{L_i} + noise g')`` in float64."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_classes)
    starts = [(i * num_classes) // num_teachers for i in range(num_teachers)]
    sets = []
    for i, start in enumerate(starts):
        gap = (starts[i + 1] if i + 1 < num_teachers else num_classes) - start
        want = 2.0 * num_classes / num_teachers * rng.uniform(0.75, 1.25)
        size = min(num_classes, max(2, gap + 1, math.ceil(want)))
        window = [(start + j) % num_classes for j in range(size)]
        sets.append([int(order[c]) for c in rng.permutation(window)])
    nnz = sum(len(s) for s in sets)
    draws = np.random.default_rng(seed + 1).standard_normal((batch, num_classes + nnz))
    logits, noises = 2.0 * draws[:, :num_classes], noise * draws[:, num_classes:]
    outputs = []
    start = 0
    for s in sets:
        outputs.append(_softmax_rows(logits[:, s] + noises[:, start : start + len(s)]))
        start += len(s)
    return Problem(sets=sets, num_classes=num_classes, outputs=outputs, family="benchmark_workload")
