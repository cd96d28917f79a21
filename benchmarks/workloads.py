"""Synthetic benchmark problems: a deterministic family of teacher sets and consistent-but-noisy outputs.

The class sets are overlapping windows on a shuffled class order, so every class is covered and the
class-overlap graph is connected at every (K, N): with N teachers over K classes each teacher
covers about ``coverage * K / N`` classes (at least 2), so each class is seen by ``coverage``
teachers on average and ``nnz`` (one sample's packed size) is about ``coverage * K``. Teacher outputs
are a shared true ``q`` restricted to each teacher's classes and perturbed by log-normal noise, so
the iterative methods have real work to do (the inputs are not exactly consistent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from uhc_fast import TeacherSet
from uhc_fast.api import METHODS
from uhc_fast.inputs import PackedProblem, pack


@dataclass(frozen=True)
class Workload:
    """One benchmark problem: ``teachers`` and per-teacher outputs ``(B, |L_i|)`` on ``device``."""

    teachers: TeacherSet
    outputs: list[torch.Tensor]
    batch: int
    num_classes: int
    num_teachers: int

    @property
    def nnz(self) -> int:
        return sum(self.teachers.sizes)

    def packed(self, method: str) -> PackedProblem:
        """The validated, packed problem ``method`` solves (probabilities or logits)."""
        problem, _ = pack(self.outputs, self.teachers, inputs="probs", value_kind=METHODS[method])
        return problem


def class_sets(num_classes: int, num_teachers: int, coverage: float = 2.0, seed: int = 0) -> list[list[int]]:
    """N overlapping windows of a shuffled ``range(K)``: full coverage, connected overlap graph.

    Teacher ``i``'s window starts at ``floor(i K / N)`` and is one class longer than the gap to the
    next start (so consecutive windows share a class and the last one wraps round to the first),
    and at least ``coverage * K / N`` long. Sizes are jittered by up to 25% to avoid equal sizes.
    """
    if num_classes < 2 or num_teachers < 1:
        raise ValueError(f"need K >= 2 and N >= 1, got K={num_classes}, N={num_teachers}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_classes)
    starts = [(i * num_classes) // num_teachers for i in range(num_teachers)]
    sets = []
    for i, start in enumerate(starts):
        gap = (starts[i + 1] if i + 1 < num_teachers else num_classes) - start
        want = coverage * num_classes / num_teachers * rng.uniform(0.75, 1.25)
        size = min(num_classes, max(2, gap + 1, math.ceil(want)))
        window = [(start + j) % num_classes for j in range(size)]
        sets.append([int(order[c]) for c in rng.permutation(window)])
    return sets


def make(
    batch: int,
    num_classes: int,
    num_teachers: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    noise: float = 0.3,
    seed: int = 0,
) -> Workload:
    """A workload of ``batch`` samples: ``q ~ softmax(2 g)``, teacher ``i`` outputs ``q_{L_i} e^{noise g'}``
    renormalised (g, g' standard normal), generated in float64 then cast to ``dtype``."""
    teachers = TeacherSet(class_sets(num_classes, num_teachers, seed=seed), num_classes=num_classes)
    nnz = sum(teachers.sizes)
    # numpy draws in row order, so sample b is the same whatever the batch size (the B sweep reuses
    # rows; torch.randn's vectorised path would not guarantee that)
    rng = np.random.default_rng(seed + 1)
    draws = torch.from_numpy(rng.standard_normal((batch, num_classes + nnz)))
    logits, noises = 2.0 * draws[:, :num_classes], noise * draws[:, num_classes:]
    outputs = []
    start = 0
    for cs in teachers.class_sets:
        z = logits[:, list(cs)] + noises[:, start : start + len(cs)]
        start += len(cs)
        outputs.append(torch.softmax(z, dim=1).to(dtype=dtype, device=device))
    return Workload(teachers, outputs, batch, num_classes, num_teachers)


def steady_batch(nnz: int, target_elements: int, lo: int = 8, hi: int = 1 << 17) -> int:
    """A batch whose packed input has about ``target_elements`` values (clamped to ``[lo, hi]``)."""
    return int(min(hi, max(lo, target_elements // max(1, nnz))))
