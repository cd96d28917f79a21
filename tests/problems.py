"""The test suite's one problem factory and one tolerance table, shared by every backend's tests.

:func:`make` draws a UHC problem with a known answer: class sets (random subsets as in the paper,
or overlapping windows of a shuffled class order), soft labels ``q``, and teacher outputs generated
from ``q`` through the relation ``p_i = q_{L_i} / S_i(q)`` (consistent teachers) or perturbed by
noise, as probabilities or logits, at a temperature, with per-teacher logit scales, weights,
declared classes that no teacher covers, and the ``alpha`` prior. The building blocks
(:func:`class_sets`, :func:`random_soft_labels`, :func:`consistent_outputs`, :func:`noisy`) are
public for tests that need a piece of it.

:func:`tolerance` is the table every comparison reads: how far two answers to the same problem may
be apart, by what separates them, in units of the computation dtype (float64 for float64 inputs,
else float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import uhc_fast
from uhc_fast.constants import compute_dtype, default_tol
from uhc_fast.methods import ITERATIVE

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------- class sets
def class_sets(
    num_classes: int,
    num_teachers: int,
    rng: np.random.Generator,
    *,
    kind: str = "subsets",
    coverage: float = 0.4,
    link: int = 1,
) -> list[list[int]]:
    """N class sets covering all K classes with a connected class-overlap graph, each teacher's
    columns in a random order (``class_sets[i][j]`` is the class of column j).

    ``kind="subsets"``: random subsets as in the paper, of sizes around ``coverage * K`` (at least 2
    where K allows); classes nobody drew go to a random teacher; teachers are linked until the
    teacher graph (teachers joined when they share at least ``link`` classes) is connected.
    ``kind="windows"``: overlapping windows of a shuffled class order (a chain of teachers, each
    sharing ``link`` classes with the next; cyclic when the windows wrap).
    """
    k, n = num_classes, num_teachers
    if kind == "windows":
        order = rng.permutation(k)
        starts = [(i * k) // n for i in range(n)]
        sets = []
        for i, start in enumerate(starts):
            gap = (starts[i + 1] if i + 1 < n else k) - start
            size = min(k, max(2, gap + link, round(coverage * k)))
            sets.append({int(order[(start + j) % k]) for j in range(size)})
    elif kind == "subsets":
        size = min(k, max(2, round(coverage * k)))
        sets = []
        for _ in range(n):
            drawn = int(rng.integers(max(1, size - size // 2), size + size // 2 + 1))
            sets.append(set(rng.choice(k, size=min(k, drawn), replace=False).tolist()))
        for c in range(k):
            if not any(c in s for s in sets):
                sets[int(rng.integers(n))].add(c)
        link = min(link, k)
        while True:
            groups = _teacher_groups(sets, link)
            if len(groups) == 1:
                break
            i, j = int(rng.choice(groups[0])), int(rng.choice(groups[1]))
            need = link - len(sets[i] & sets[j])
            # teacher i takes some of j's classes, then j some of i's, then both classes neither has
            for source, target in ((sets[j] - sets[i], (i,)), (sets[i] - sets[j], (j,)), (None, (i, j))):
                pool = sorted(set(range(k)) - sets[i] - sets[j] if source is None else source)
                take = rng.choice(pool, size=min(need, len(pool)), replace=False).tolist() if pool else []
                for t in target:
                    sets[t].update(take)
                need -= len(take)
                if need == 0:
                    break
    else:
        raise ValueError(f"kind={kind!r}")
    return [[int(c) for c in rng.permutation(sorted(s))] for s in sets]


def _teacher_groups(sets: list[set], link: int) -> list[list[int]]:
    seen, groups = set(), []
    for start in range(len(sets)):
        if start in seen:
            continue
        stack, members = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            members.append(i)
            for j in range(len(sets)):
                if j not in seen and len(sets[i] & sets[j]) >= link:
                    seen.add(j)
                    stack.append(j)
        groups.append(members)
    return groups


# ---------------------------------------------------------------------------------------- outputs
def random_soft_labels(batch: int, num_classes: int, seed: int, dtype=torch.float64, sharpness: float = 2.0):
    """``softmax(sharpness * g)`` per row, g standard normal."""
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(batch, num_classes, generator=gen, dtype=dtype), dim=1)


def consistent_outputs(
    q: torch.Tensor,
    sets: Sequence[Sequence[int]],
    kind: str = "probs",
    *,
    temperature: float = 1.0,
    scales: Sequence[float] | None = None,
    shift: float = 3.0,
    seed: int = 1234,
) -> list[torch.Tensor]:
    """Teacher outputs generated from soft labels q through the relation, at ``temperature``.

    ``probs``: ``p_i`` proportional to ``q_{L_i}^T`` (the library's ``softmax(log p / T)`` is then
    ``q_{L_i} / S_i``). ``logits``: ``z_il = T (v_i log q_l + c_i)`` with a random per-sample shift
    ``c_i`` and the per-teacher scales ``v`` (default 1).
    """
    gen = torch.Generator().manual_seed(seed)
    outputs = []
    for i, cs in enumerate(sets):
        log_q = torch.log(q[:, list(cs)])
        if kind == "probs":
            outputs.append(torch.softmax(temperature * log_q, dim=1))
        else:
            v = 1.0 if scales is None else float(scales[i])
            c = shift * torch.randn(q.shape[0], 1, generator=gen, dtype=q.dtype)
            outputs.append(temperature * (v * log_q + c))
    return outputs


def noisy(outputs: Sequence[torch.Tensor], level: float, seed: int = 0, kind: str = "probs") -> list[torch.Tensor]:
    """Inconsistent teachers: probabilities times log-normal noise, renormalised (still valid
    probabilities); logits plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in outputs:
        g = level * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        if kind == "probs":
            x = x * torch.exp(g)
            out.append(x / x.sum(dim=1, keepdim=True))
        else:
            out.append(x + g)
    return out


# ---------------------------------------------------------------------------------------- problems
@dataclass
class Case:
    """One problem: class sets over ``num_classes`` (uncovered classes included), the generating
    soft labels ``truth`` (zero on uncovered classes) and the teachers' float64 outputs."""

    sets: list[list[int]]
    num_classes: int
    truth: torch.Tensor
    outputs: list[torch.Tensor]
    inputs: str = "probs"
    temperature: float = 1.0
    weights: list[float] | None = None
    alpha: float | None = None
    consistent: bool = True
    notes: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.truth.shape[0])

    @property
    def num_teachers(self) -> int:
        return len(self.sets)

    def tensors(self, dtype: torch.dtype = torch.float64, device="cpu") -> list[torch.Tensor]:
        """The outputs in ``dtype`` on ``device`` (fresh tensors)."""
        return [x.to(dtype=dtype, device=device).clone() for x in self.outputs]

    def kwargs(self, **extra) -> dict:
        """``estimate``'s keyword arguments for this problem (``extra`` overrides)."""
        options = {"inputs": self.inputs, "num_classes": self.num_classes, "temperature": self.temperature}
        if self.weights is not None:
            options["weights"] = self.weights
        if self.alpha is not None:
            options["alpha"] = self.alpha
        options.update(extra)
        return options

    def estimate(self, method: str, backend: str = "torch", dtype=torch.float64, device="cpu", outputs=None, **extra):
        """``(soft, info)`` from ``uhc_fast.estimate`` on this problem's outputs in ``dtype``."""
        outputs = self.tensors(dtype, device) if outputs is None else outputs
        return uhc_fast.estimate(outputs, self.sets, method, backend=backend, return_info=True, **self.kwargs(**extra))

    def teachers(self) -> uhc_fast.TeacherSet:
        return uhc_fast.TeacherSet(self.sets, num_classes=self.num_classes)


def make(
    seed: int,
    *,
    batch: int = 8,
    classes: int = 13,
    teachers: int = 4,
    sets: str = "subsets",
    coverage: float = 0.4,
    link: int = 1,
    noise: float = 0.0,
    inputs: str = "probs",
    temperature: float = 1.0,
    scales: Sequence[float] | None = None,
    weights: bool | Sequence[float] = False,
    uncovered: int = 0,
    alpha: float | None = None,
    sharpness: float = 2.0,
) -> Case:
    """A random problem (see the module docstring).

    Args:
        seed: everything is drawn from it.
        batch, classes, teachers: B, the number of covered classes, N.
        sets: ``"subsets"`` or ``"windows"`` (:func:`class_sets`), with ``coverage`` and ``link``.
        noise: 0 for consistent teachers; else the level of :func:`noisy`.
        inputs: ``"probs"`` or ``"logits"``.
        temperature: the teachers' temperature (and the one ``estimate`` is given).
        scales: per-teacher logit scales (teachers at different temperatures, for mf-lu); they are
            normalised to the weighted mean 1 that mf-lu reports at.
        weights: True for random per-teacher weights in [0.5, 2], or the weights.
        uncovered: classes no teacher covers, declared through ``num_classes`` (at random places).
        alpha: the prior's weight, passed to ``estimate``.
        sharpness: ``q = softmax(sharpness * g)``.
    """
    rng = np.random.default_rng(seed)
    chosen = class_sets(classes, teachers, rng, kind=sets, coverage=coverage, link=link)
    if isinstance(weights, bool):
        w = rng.uniform(0.5, 2.0, teachers).round(3).tolist() if weights else None
    else:
        w = [float(x) for x in weights]
    if scales is not None:
        ws = np.ones(teachers) if w is None else np.asarray(w)
        scales = (np.asarray(scales, dtype=np.float64) * ws.sum() / (np.asarray(scales) * ws).sum()).tolist()
    q = random_soft_labels(batch, classes, seed, sharpness=sharpness)
    outputs = consistent_outputs(q, chosen, inputs, temperature=temperature, scales=scales, seed=seed + 1)
    if noise > 0:
        outputs = noisy(outputs, noise, seed + 2, kind=inputs)
    truth = q
    if uncovered:  # the covered classes take random places among all classes
        total = classes + uncovered
        place = np.sort(rng.choice(total, size=classes, replace=False))
        chosen = [[int(place[c]) for c in cs] for cs in chosen]
        truth = q.new_zeros(batch, total)
        truth[:, torch.from_numpy(place)] = q
    return Case(
        sets=chosen,
        num_classes=classes + uncovered,
        truth=truth,
        outputs=outputs,
        inputs=inputs,
        temperature=temperature,
        weights=w,
        alpha=alpha,
        consistent=noise == 0 and alpha in (None, 0),
        notes={"seed": seed, "sets": sets, "scales": scales},
    )


# ---------------------------------------------------------------------------------------- tolerances
# max |q - q'| between two answers to the same problem, by what separates them. Each entry is a
# multiple of a unit of the computation dtype: "eps" its machine epsilon, "tol" the iterative
# methods' default tolerance in it (1e-9 in float64, 1e-5 in float32), "input" the machine epsilon
# of the inputs' own dtype.
TOLERANCES = {
    # the same closed form (sd, mf-lf), two backends or code paths: rounding
    "closed": ("eps", 256),
    # the same iterative method, two backends or code paths, rows converged on both: each stops
    # within about tol of the optimum
    "iterative": ("tol", 10),
    # the same solver, its arithmetic in another order (SIMD lanes against one lane, instruction sets)
    "rounding": ("eps", 4096),
    # consistent teachers: the answer is the generating q (closed forms: rounding of the logs)
    "recovery": ("tol", 100),
    # the same method on inputs rounded to a narrower dtype against the float64 answer (plus what
    # separates two computations in the computation dtype)
    "input": ("input", 20),
}


def tolerance(method: str, dtype: torch.dtype, what: str = "agree") -> float:
    """The largest max-abs difference of soft labels allowed for ``method`` on inputs of ``dtype``.

    ``what``: ``"agree"`` (two backends or code paths on the same inputs), ``"rounding"`` (the
    same solver with its arithmetic reordered), ``"recovery"`` (against the generating q of
    consistent teachers), or ``"input"`` (inputs rounded to ``dtype`` against float64 inputs).
    """
    if what == "agree":
        what = "iterative" if method in ITERATIVE else "closed"
    unit, multiple = TOLERANCES[what]
    computed = compute_dtype(dtype)
    value = {
        "eps": torch.finfo(computed).eps,
        "tol": default_tol(computed),
        "input": torch.finfo(dtype).eps,
    }[unit]
    if what == "input":  # on top of what separates two computations in the computation dtype
        return multiple * value + tolerance(method, dtype)
    return multiple * value


def max_diff(a, b) -> float:
    """max |a - b| as a float (0 for empty arrays)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max()) if a.numel() else 0.0


def random_class_sets(num_classes: int, num_teachers: int, coverage: float, rng: np.random.Generator):
    """:func:`class_sets` with the positional signature older test modules call."""
    return class_sets(num_classes, num_teachers, rng, coverage=coverage)
