"""The teachers' class sets: union label space, mask, packed layout, connectivity.

A :class:`TeacherSet` is built once from the class sets and reused for every batch: everything
that depends only on which teacher covers which class (the mask, the packed column layout, the
overlap-graph components) is computed here, in one place.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


class DisconnectedClassesWarning(UserWarning):
    """The class-overlap graph has several components; the split of mass between them is set by
    the ``alpha`` prior rather than by the teachers."""


@dataclass(frozen=True)
class Layout:
    """The packed column layout of one sample's teacher outputs, on one device.

    Teacher ``i``'s outputs occupy columns ``offsets[i]:offsets[i+1]`` of a ``(B, nnz)`` tensor;
    column ``j`` holds class ``class_index[j]`` of teacher ``teacher_index[j]``.
    """

    class_index: torch.Tensor  # (nnz,) int64
    teacher_index: torch.Tensor  # (nnz,) int64
    offsets: torch.Tensor  # (N + 1,) int64
    mask: torch.Tensor  # (N, K) float32, 1 where the teacher covers the class
    covered: torch.Tensor  # (K,) bool, classes covered by at least one teacher
    num_teachers: int
    num_classes: int

    @property
    def nnz(self) -> int:
        return int(self.class_index.numel())

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor:
        return self.mask.to(dtype)


class TeacherSet:
    """The validated description of N teachers' class sets over a union of K classes.

    Args:
        class_sets: N sequences, one per teacher, of class indices (ints) or class names
            (any hashable, typically strings); all teachers use the same kind. Column ``j`` of
            teacher ``i``'s outputs is the class ``class_sets[i][j]``.
        num_classes: K, to declare classes that no teacher covers (they get zero mass). With
            integer class sets K defaults to ``max index + 1`` and every class must be covered.
        classes: a fixed union order of names (name-valued class sets only); classes listed but
            covered by no teacher are declared, as with ``num_classes``.

    Attributes:
        classes: the union's class labels in index order (names, or ``range(K)`` for ints).
        class_sets: per teacher, a tuple of class indices into the union.
        mask: ``(N, K)`` bool tensor, ``mask[i, l]`` iff teacher ``i`` covers class ``l``.
        components: the connected components of the class-overlap graph (lists of class
            indices, covered classes only), largest first.
        uncovered: class indices that no teacher covers.
    """

    def __init__(
        self,
        class_sets: Sequence[Sequence[Hashable]],
        num_classes: int | None = None,
        classes: Sequence[Hashable] | None = None,
    ) -> None:
        if isinstance(class_sets, (str, bytes)) or not isinstance(class_sets, Sequence):
            raise TypeError("class_sets must be a sequence of per-teacher class sequences")
        if len(class_sets) == 0:
            raise ValueError("class_sets is empty: at least one teacher is needed")
        declared = num_classes is not None or classes is not None
        sets = []
        for i, cs in enumerate(class_sets):
            if isinstance(cs, (str, bytes)) or not isinstance(cs, Sequence | torch.Tensor):
                raise TypeError(f"teacher {i}: its class set must be a sequence, got {type(cs).__name__}")
            cs = cs.tolist() if isinstance(cs, torch.Tensor) else list(cs)
            if len(cs) == 0:
                raise ValueError(f"teacher {i}: empty class set")
            sets.append(cs)

        by_index = all(_is_int(c) for cs in sets for c in cs)
        if by_index:
            if classes is not None:
                raise ValueError("classes= names the union order; it needs class names, not indices")
            self.class_sets = tuple(tuple(int(c) for c in cs) for cs in sets)
            top = max(max(cs) for cs in self.class_sets) + 1
            for i, cs in enumerate(self.class_sets):
                if min(cs) < 0:
                    raise ValueError(f"teacher {i}: negative class index {min(cs)}")
            if num_classes is None:
                num_classes = top
            elif num_classes < top:
                bad = next(i for i, cs in enumerate(self.class_sets) if max(cs) >= num_classes)
                raise ValueError(
                    f"teacher {bad}: class index {max(self.class_sets[bad])} is out of range for "
                    f"num_classes={num_classes}"
                )
            self.classes: tuple[Hashable, ...] = tuple(range(num_classes))
        else:
            first_is_int = _is_int(sets[0][0])
            mixed = [i for i, cs in enumerate(sets) if any(_is_int(c) != first_is_int for c in cs)]
            if mixed:
                raise TypeError(f"teacher {mixed[0]}: class sets mix indices and names; use one kind")
            if classes is not None:
                order = list(classes)
                if len(set(order)) != len(order):
                    raise ValueError("classes= lists a class twice")
            else:
                order = list(dict.fromkeys(c for cs in sets for c in cs))
            if num_classes is not None and num_classes != len(order):
                raise ValueError(f"num_classes={num_classes} but the class names give {len(order)} classes")
            position = {c: k for k, c in enumerate(order)}
            for i, cs in enumerate(sets):
                missing = [c for c in cs if c not in position]
                if missing:
                    raise ValueError(f"teacher {i}: classes {missing[:5]} are not in classes=")
            self.class_sets = tuple(tuple(position[c] for c in cs) for cs in sets)
            self.classes = tuple(order)
            num_classes = len(order)

        for i, cs in enumerate(self.class_sets):
            if len(set(cs)) != len(cs):
                dup = next(c for c in cs if cs.count(c) > 1)
                raise ValueError(f"teacher {i}: class {self.classes[dup]!r} is listed twice")

        self.num_classes = int(num_classes)
        self.num_teachers = len(self.class_sets)
        mask = torch.zeros(self.num_teachers, self.num_classes, dtype=torch.bool)
        for i, cs in enumerate(self.class_sets):
            mask[i, list(cs)] = True
        self.mask = mask
        self.uncovered = tuple(torch.nonzero(~mask.any(0)).flatten().tolist())
        if self.uncovered and not declared:
            raise ValueError(
                f"classes {list(self.uncovered)[:10]} are covered by no teacher and cannot be "
                "estimated; pass num_classes= to declare them (they then get zero mass)"
            )
        self.components = _components(self.class_sets, self.num_classes, self.uncovered)
        self._layouts: dict[torch.device, Layout] = {}
        self._warned_disconnected = False

    # ------------------------------------------------------------------ properties
    @property
    def sizes(self) -> tuple[int, ...]:
        """``|L_i|`` per teacher: the number of output columns each teacher has."""
        return tuple(len(cs) for cs in self.class_sets)

    @property
    def is_connected(self) -> bool:
        return len(self.components) <= 1

    def __len__(self) -> int:
        return self.num_teachers

    def __repr__(self) -> str:
        return (
            f"TeacherSet(num_teachers={self.num_teachers}, num_classes={self.num_classes}, "
            f"nnz={sum(self.sizes)}, components={len(self.components)}, "
            f"uncovered={len(self.uncovered)})"
        )

    # ------------------------------------------------------------------ layout
    def layout(self, device: torch.device | str = "cpu") -> Layout:
        """The packed layout on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._layouts:
            sizes = torch.tensor(self.sizes, dtype=torch.int64)
            offsets = torch.zeros(self.num_teachers + 1, dtype=torch.int64)
            offsets[1:] = sizes.cumsum(0)
            class_index = torch.tensor([c for cs in self.class_sets for c in cs], dtype=torch.int64)
            teacher_index = torch.repeat_interleave(torch.arange(self.num_teachers), sizes)
            self._layouts[device] = Layout(
                class_index=class_index.to(device),
                teacher_index=teacher_index.to(device),
                offsets=offsets.to(device),
                mask=self.mask.to(device=device, dtype=torch.float32),
                covered=self.mask.any(0).to(device),
                num_teachers=self.num_teachers,
                num_classes=self.num_classes,
            )
        return self._layouts[device]

    def with_prior(self) -> TeacherSet:
        """This set plus a pseudo-teacher covering every covered class (the ``alpha`` prior)."""
        covered = [k for k in range(self.num_classes) if k not in set(self.uncovered)]
        return TeacherSet([*self.class_sets, covered], num_classes=self.num_classes)

    def warn_if_disconnected(self) -> None:
        """Warn once per TeacherSet that the overlap graph is disconnected, naming components."""
        if self.is_connected or self._warned_disconnected:
            return
        self._warned_disconnected = True
        shown = [
            [self.classes[k] for k in comp[:8]] + (["..."] if len(comp) > 8 else []) for comp in self.components[:6]
        ]
        warnings.warn(
            f"the class-overlap graph has {len(self.components)} components {shown}: the teachers "
            "do not determine how mass splits between them, so a uniform prior with weight alpha "
            "decides it (pass alpha= to choose its strength)",
            DisconnectedClassesWarning,
            stacklevel=3,
        )


def as_teacher_set(class_sets, num_classes: int | None = None) -> TeacherSet:
    """Accept either a TeacherSet or raw class sets (the public functions' convenience)."""
    if isinstance(class_sets, TeacherSet):
        if num_classes is not None and num_classes != class_sets.num_classes:
            raise ValueError(f"num_classes={num_classes} disagrees with the TeacherSet's {class_sets.num_classes}")
        return class_sets
    return TeacherSet(class_sets, num_classes=num_classes)


def _is_int(c) -> bool:
    return (isinstance(c, int) and not isinstance(c, bool)) or (
        hasattr(c, "dtype") and getattr(c.dtype, "kind", "") in "iu" and getattr(c, "ndim", 1) == 0
    )


def _components(class_sets, num_classes: int, uncovered) -> list[list[int]]:
    """Connected components of the class-overlap graph (union-find over teachers' sets)."""
    parent = list(range(num_classes))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for cs in class_sets:
        root = find(cs[0])
        for c in cs[1:]:
            other = find(c)
            if other != root:
                parent[other] = root
    skip = set(uncovered)
    groups: dict[int, list[int]] = {}
    for k in range(num_classes):
        if k not in skip:
            groups.setdefault(find(k), []).append(k)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))
