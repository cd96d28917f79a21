"""Synthetic benchmark problems: teacher class sets of three families and consistent-but-noisy outputs.

Families (``FAMILIES``):

* ``subsets`` (the primary workload, the paper's setting): every teacher covers a random subset of
  the K classes, its own coverage drawn per source, ``c_i ~ U((1 - spread) c, (1 + spread) c)``
  around the mean fraction ``c`` (``spread = 0.5``: ``U(0.5 c, 1.5 c)``), at least 2 classes. A class
  no teacher drew goes to one teacher at random, and a teacher whose classes are cut off from the
  rest takes one class of the largest component, so every class is covered and the class-overlap
  graph is connected. Almost every class then has its own set of covering teachers: the number of
  groups ``G`` is close to K.
* ``windows`` (secondary): teacher ``i`` covers a window of a shuffled class order overlapping the
  next teacher's; few distinct teacher sets (``G`` about ``2N``), the earlier benchmarks' family.
* ``unequal``: a few large sources and many small ones. A quarter of the teachers (at least one) are
  large, covering ``U(0.4, 0.7)`` of the classes each; the rest are small, with fractions
  log-uniform in ``[0.005, 0.05]`` (at least 2 classes); the classes no teacher drew go to the
  large sources, and connectivity is repaired as above.

Teacher outputs: a shared true ``q = softmax(2 g)`` per sample, teacher ``i`` reports
``softmax(2 g_{L_i} + noise g')`` over its classes (g, g' standard normal), so the inputs are close to
consistent but not exactly, and the iterative methods have work to do. Rows are drawn in row order
from one generator, in chunks, so sample ``b`` is the same whatever the batch size.

:func:`stats` gives the structure's sizes every table reports: ``G`` (distinct teacher sets among
the classes), ``nnz`` (one sample's packed size), ``E`` (group-teacher entries), ``sum_l d_l^2``
and ``sum_g d_g^2`` (``d``: the number of teachers covering a class or a group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from uhc_fast import TeacherSet
from uhc_fast.inputs import Batch, PackedProblem, convert, pack
from uhc_fast.methods import METHODS
from uhc_fast.options import Options
from uhc_fast.problem import class_components

FAMILIES = ("subsets", "windows", "unequal")
# the default mean coverage of the subsets family in the runner's grid: about 5 teachers per class
# (25% subsets at N = 20, the workload), at most 60% per teacher
MEAN_TEACHERS_PER_CLASS = 5.0


def default_fraction(num_teachers: int) -> float:
    """The runner's mean per-teacher coverage for N teachers: ``min(0.6, 5 / N)`` (nnz about 5K)."""
    return min(0.6, MEAN_TEACHERS_PER_CLASS / max(1, num_teachers))


# ---------------------------------------------------------------------- class sets
def windows(num_classes: int, num_teachers: int, coverage: float = 2.0, seed: int = 0) -> list[list[int]]:
    """N overlapping windows of a shuffled ``range(K)``: full coverage, connected overlap graph.

    Teacher ``i``'s window starts at ``floor(i K / N)`` and is one class longer than the gap to the
    next start (so consecutive windows share a class and the last one wraps round to the first),
    and at least ``coverage * K / N`` long (``coverage``: teachers per class on average). Sizes are
    jittered by up to 25%. (``tests/oracles.py`` re-creates this family: keep the draws in step.)
    """
    _check(num_classes, num_teachers)
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


def subsets(
    num_classes: int, num_teachers: int, fraction: float = 0.25, spread: float = 0.5, seed: int = 0
) -> list[list[int]]:
    """Random class subsets, teacher ``i`` covering ``c_i ~ U((1 - spread) c, (1 + spread) c)`` of the
    classes (``c = fraction``), then every class covered and the overlap graph connected."""
    _check(num_classes, num_teachers)
    if not 0 < fraction <= 1 or not 0 <= spread < 1:
        raise ValueError(f"need 0 < fraction <= 1 and 0 <= spread < 1, got {fraction}, {spread}")
    rng = np.random.default_rng(seed)
    fractions = rng.uniform((1 - spread) * fraction, min(1.0, (1 + spread) * fraction), num_teachers)
    sets = [_draw(rng, num_classes, f) for f in fractions]
    return _cover_and_connect(sets, num_classes, rng, absorb=range(num_teachers))


def unequal(num_classes: int, num_teachers: int, large: int | None = None, seed: int = 0) -> list[list[int]]:
    """A few large sources (``large``, default a quarter of N, at least 1) covering ``U(0.4, 0.7)`` of
    the classes each and many small ones (log-uniform ``[0.005, 0.05]``); uncovered classes go to the
    large sources. Teachers are listed in a random order (large ones are not all first)."""
    _check(num_classes, num_teachers)
    rng = np.random.default_rng(seed)
    large = max(1, num_teachers // 4) if large is None else large
    if not 1 <= large <= num_teachers:
        raise ValueError(f"large={large}: need 1 <= large <= N={num_teachers}")
    fractions = np.concatenate(
        [rng.uniform(0.4, 0.7, large), np.exp(rng.uniform(math.log(0.005), math.log(0.05), num_teachers - large))]
    )
    order = rng.permutation(num_teachers)
    sets = [_draw(rng, num_classes, fractions[j]) for j in order]
    big = [pos for pos, j in enumerate(order) if j < large]
    return _cover_and_connect(sets, num_classes, rng, absorb=big)


def class_sets(
    family: str, num_classes: int, num_teachers: int, *, fraction: float | None = None, seed: int = 0
) -> list[list[int]]:
    """The class sets of ``family``: ``fraction`` is the subsets family's mean coverage (default
    :func:`default_fraction`) and the windows family's coverage as a fraction (``coverage = fraction
    N``, default 2 teachers per class); the unequal family ignores it."""
    if family == "subsets":
        return subsets(
            num_classes, num_teachers, default_fraction(num_teachers) if fraction is None else fraction, seed=seed
        )
    if family == "windows":
        coverage = 2.0 if fraction is None else fraction * num_teachers
        return windows(num_classes, num_teachers, coverage=coverage, seed=seed)
    if family == "unequal":
        return unequal(num_classes, num_teachers, seed=seed)
    raise ValueError(f"family={family!r}: expected one of {FAMILIES}")


def _check(num_classes: int, num_teachers: int) -> None:
    if num_classes < 2 or num_teachers < 1:
        raise ValueError(f"need K >= 2 and N >= 1, got K={num_classes}, N={num_teachers}")


def _draw(rng: np.random.Generator, num_classes: int, fraction: float) -> list[int]:
    size = min(num_classes, max(2, round(fraction * num_classes)))
    return [int(c) for c in rng.choice(num_classes, size, replace=False)]


def _cover_and_connect(sets: list[list[int]], num_classes: int, rng: np.random.Generator, absorb) -> list[list[int]]:
    """Give every uncovered class to a random teacher of ``absorb``; then, while the overlap graph is
    disconnected, give a teacher of a smaller component one class of the largest component."""
    absorb = list(absorb)
    covered = np.zeros(num_classes, dtype=bool)
    for cs in sets:
        covered[cs] = True
    for c in np.nonzero(~covered)[0]:
        sets[absorb[rng.integers(len(absorb))]].append(int(c))
    while True:
        parts = class_components(sets, num_classes)
        if len(parts) == 1:
            return sets
        main = parts[0]
        # the first teacher wholly outside the largest component joins it through one class
        inside = set(main)
        i = next(j for j, cs in enumerate(sets) if cs[0] not in inside)
        candidates = [c for c in main if c not in set(sets[i])]
        sets[i].append(int(candidates[rng.integers(len(candidates))]))


# ---------------------------------------------------------------------- structure statistics
def stats(teachers: TeacherSet) -> dict[str, int]:
    """``N, K, nnz, G, E, P`` of the layout (``P``: teacher pairs summed over groups) and
    ``d2_classes = sum_l d_l^2``, ``d2_groups = sum_g d_g^2`` (``d``: covering teachers)."""
    layout = teachers.layout("cpu")
    header = layout.structure[:6].tolist()
    mask = teachers.mask
    d_class = mask.sum(dim=0).double()
    groups = torch.unique(mask.T, dim=0)
    d_group = groups.sum(dim=1).double()
    return {
        "N": header[0],
        "K": header[1],
        "nnz": header[2],
        "G": layout.num_groups,
        "E": header[4],
        "P": header[5],
        "d2_classes": int((d_class**2).sum()),
        "d2_groups": int((d_group**2).sum()),
    }


# ---------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class Workload:
    """One benchmark problem: ``teachers`` and per-teacher outputs ``(B, |L_i|)`` on ``device``."""

    teachers: TeacherSet
    outputs: list
    batch: int
    num_classes: int
    num_teachers: int
    family: str = "subsets"

    @property
    def nnz(self) -> int:
        return sum(self.teachers.sizes)

    @property
    def stats(self) -> dict[str, int]:
        return stats(self.teachers)

    @property
    def groups(self) -> int:
        return self.teachers.layout("cpu").num_groups

    def convert(self, method: str, backend: str = "auto", tol: float | None = None, rows: int | None = None) -> Batch:
        """The checked :class:`~uhc_fast.inputs.Batch` that ``estimate`` hands its backend (first ``rows``)."""
        outputs = self.outputs if rows is None else [o[:rows] for o in self.outputs]
        return convert(outputs, self.teachers, Options(method=method, backend=backend, tol=tol))

    def packed(self, method: str, dtype: torch.dtype | None = None, rows: int | None = None) -> PackedProblem:
        """The validated, packed problem the torch solvers of ``method`` solve (in ``dtype``, default
        the batch's compute dtype; the torch backend itself packs in float64)."""
        return pack(self.convert(method, rows=rows), METHODS[method].value_kind, dtype)


def make(
    batch: int,
    num_classes: int,
    num_teachers: int,
    *,
    family: str = "subsets",
    fraction: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    noise: float = 0.3,
    seed: int = 0,
    numpy: bool = False,
) -> Workload:
    """A workload of ``batch`` samples of ``family`` (see the module docstring), generated in float64
    then cast to ``dtype``; ``numpy=True`` gives numpy arrays (``dtype`` float32 or float64)."""
    sets = class_sets(family, num_classes, num_teachers, fraction=fraction, seed=seed)
    teachers = TeacherSet(sets, num_classes=num_classes)
    sizes = teachers.sizes
    nnz = sum(sizes)
    columns = [list(cs) for cs in teachers.class_sets]
    rng = np.random.default_rng(seed + 1)
    parts: list[list[torch.Tensor]] = [[] for _ in sizes]
    chunk = max(1, (1 << 22) // (num_classes + nnz))  # rows per draw: about 32 MB of float64
    for start in range(0, batch, chunk):
        rows = min(chunk, batch - start)
        draws = torch.from_numpy(rng.standard_normal((rows, num_classes + nnz)))
        logits, noises = 2.0 * draws[:, :num_classes], noise * draws[:, num_classes:]
        offset = 0
        for i, cs in enumerate(columns):
            z = logits[:, cs] + noises[:, offset : offset + len(cs)]
            offset += len(cs)
            parts[i].append(torch.softmax(z, dim=1).to(dtype=dtype))
    outputs = [torch.cat(p) if p else torch.empty(0, n, dtype=dtype) for p, n in zip(parts, sizes, strict=True)]
    if numpy:
        outputs = [o.numpy() for o in outputs]
    else:
        outputs = [o.to(device) for o in outputs]
    return Workload(teachers, outputs, batch, num_classes, num_teachers, family)


def steady_batch(nnz: int, target_elements: int, lo: int = 8, hi: int = 1 << 17) -> int:
    """A batch whose packed input has about ``target_elements`` values (clamped to ``[lo, hi]``)."""
    return int(min(hi, max(lo, target_elements // max(1, nnz))))
