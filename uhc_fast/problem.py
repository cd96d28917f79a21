"""The teachers' class sets: union label space, mask, packed layout, connectivity.

A :class:`TeacherSet` is built once from the class sets and reused for every batch: everything
that depends only on which teacher covers which class (the mask, the packed column layout, the
overlap-graph components) is computed here, in one place.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import DisconnectedClassesWarning, InputError, UnidentifiableScalesWarning

# The sections of the structure buffer, in order (csrc/core/structure.h reads the same list; a test
# compares them). Lengths follow from the header (N, K, nnz, G, E): E = sum over groups of their
# teacher counts.
STRUCTURE_SECTIONS = (
    ("offsets", "N + 1"),  # teacher i owns packed columns offsets[i] .. offsets[i + 1]
    ("class_index", "nnz"),  # the class of each packed column
    ("cls_ptr", "K + 1"),  # class l's entries are cls_ptr[l] .. cls_ptr[l + 1] of cls_col / cls_teacher
    ("cls_col", "nnz"),  # packed column of each entry, entries grouped by class, teachers ascending
    ("cls_teacher", "nnz"),  # teacher of each entry
    ("grp_cls_ptr", "G + 1"),  # group g's classes are grp_cls[grp_cls_ptr[g] .. grp_cls_ptr[g + 1]]
    ("grp_cls", "K"),  # classes ordered by group
    ("grp_ptr", "G + 1"),  # group g's teachers are grp_teacher[grp_ptr[g] .. grp_ptr[g + 1]]
    ("grp_teacher", "E"),  # teachers of each group, ascending
    ("col_entry", "nnz"),  # the (group, teacher) entry each packed column adds its evidence to
    ("class_group", "K"),  # the group of each class
    ("scale_anchor", "N"),  # 1 for the teachers whose mf-lu scale is held (one per scale component), 2 for the prior
    ("tch_ptr", "N + 1"),  # teacher i's groups are tch_group[tch_ptr[i] .. tch_ptr[i + 1]]
    ("tch_group", "E"),  # the groups of each teacher: those it shares with other teachers first
    ("tch_shared", "N"),  # how many of teacher i's groups it shares with other teachers
    ("pair_ptr", "N (N - 1) / 2 + 1"),  # teachers i < j (pairs row-major) share the groups pair_group[pair_ptr[p] ..]
    ("pair_group", "P"),  # groups by teacher pair
)
STRUCTURE_HEADER = ("N", "K", "nnz", "G", "E", "P")


@dataclass(frozen=True)
class Layout:
    """The packed column layout of one sample's teacher outputs and what derives from the mask,
    on one device: computed once per TeacherSet and device, shared by every call.

    Teacher ``i``'s outputs occupy columns ``offsets[i]:offsets[i+1]`` of a ``(B, nnz)`` tensor;
    column ``j`` holds class ``class_index[j]`` of teacher ``teacher_index[j]``. Classes covered by
    the same set of teachers form a *group*: the compiled `ce` iterates over groups, not classes.

    Attributes:
        structure: the int32 buffer the compiled core indexes with: the header (N, K, nnz, G, E)
            then the sections of :data:`STRUCTURE_SECTIONS`.
        colmap: ``(N, K)`` int32, the packed column of teacher ``i``'s class ``l``, or -1 (Triton).
    """

    class_index: torch.Tensor  # (nnz,) int64
    teacher_index: torch.Tensor  # (nnz,) int64
    offsets: torch.Tensor  # (N + 1,) int64
    mask: torch.Tensor  # (N, K) float32, 1 where the teacher covers the class
    covered: torch.Tensor  # (K,) bool, classes covered by at least one teacher
    structure: torch.Tensor  # int32, see above
    colmap: torch.Tensor  # (N, K) int32
    scale_anchor: torch.Tensor  # (N,) bool, the teachers whose mf-lu scale is held fixed
    prior_mask: torch.Tensor  # (N,) bool, True for the alpha prior teacher
    num_teachers: int
    num_classes: int
    num_groups: int
    _systems: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.class_index.numel())

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor:
        return self.mask.to(dtype)

    def mf_lf_system(self, weights: torch.Tensor | Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """The ``(N, N)`` matrix ``S`` with which ``c = S b`` solves mf-lf's eliminated normal
        equations for per-teacher weights ``weights`` (a tensor or plain floats; cached per weights
        and dtype).

        Eliminating ``u`` from ``min sum_i w_i sum_{l in L_i} (z_il - u_l - c_i)^2`` leaves
        ``A c = diag(w) b`` with ``b_i = sum_{l in L_i} (z_il - zbar_l)`` (``zbar`` the weighted mean
        of the teachers' logits of each class) and ``A`` the weighted graph Laplacian of the
        teachers, ``A_ij = -w_i w_j sum_{l in L_i and L_j} 1 / W_l`` (``W_l = sum_{i covers l} w_i``).
        Its null space is the common shift of ``c``, which softmax ignores: the heaviest teacher is
        grounded (its ``c_i = 0``) and the rest solved exactly in float64 (a pseudo-inverse would
        amplify the rounding in that null space). The error then grows with the ratio of an
        ungrounded teacher's weight to the lighter weights it shares classes with (about 1e-16 times
        that ratio), so one dominant teacher costs no accuracy, and several dominant ones do.
        """
        values = tuple(weights.tolist()) if isinstance(weights, torch.Tensor) else tuple(weights)
        key = (values, dtype)  # (plain floats: under torch.compile the lookup is a constant)
        if key not in self._systems:
            w = torch.tensor(values, dtype=torch.float64)
            self._systems[key] = _mf_lf_system(self.mask.double().cpu(), w).to(device=self.mask.device, dtype=dtype)
        return self._systems[key]


def _mf_lf_system(mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from .linalg import grounded_laplacian_solve

    n = mask.shape[0]
    # the teachers by weight, the heaviest last: it is the one grounded (and in a component without
    # it, the elimination grounds that component's heaviest). A heavy teacher's b_i is a small
    # difference of its own logits and the means it dominates, so its shift must not be solved for.
    order = torch.argsort(w, stable=True)
    w, mask = w[order], mask[order]
    class_weight = (w @ mask).clamp_min(torch.finfo(torch.float64).tiny)
    links = (mask * w[:, None] / class_weight) @ (mask * w[:, None]).T  # w_i w_j sum_l M_il M_jl / W_l
    links.fill_diagonal_(0)
    ordered = torch.zeros(n, n, dtype=torch.float64)
    if n > 1:
        inverse = grounded_laplacian_solve(
            links[None, :-1, :-1], links[None, :-1, -1], torch.eye(n - 1, dtype=torch.float64)[None]
        )[0][0]
        ordered[:-1, :-1] = inverse * w[:-1]  # c = A^-1 diag(w) b on the ungrounded teachers
    system = torch.zeros(n, n, dtype=torch.float64)
    system[order[:, None], order[None, :]] = ordered
    return system


def _structure(
    class_sets: tuple[tuple[int, ...], ...], mask: np.ndarray, anchors: np.ndarray
) -> tuple[np.ndarray, int]:
    """The structure buffer (see :class:`Layout`) and the number of groups, built on the host."""
    n, k = mask.shape
    sizes = np.array([len(cs) for cs in class_sets], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    class_index = np.array([c for cs in class_sets for c in cs], dtype=np.int64)
    teacher_index = np.repeat(np.arange(n), sizes)
    nnz = class_index.size
    cls_col = np.argsort(class_index, kind="stable")  # teacher-major columns: teachers stay ascending
    cls_ptr = np.concatenate([[0], np.cumsum(np.bincount(class_index, minlength=k))])
    cls_teacher = teacher_index[cls_col]
    sets, class_group = np.unique(mask.T, axis=0, return_inverse=True)  # (G, N) teacher sets
    # groups ordered by their number of teachers: the solvers' per-group loops then run the same trip
    # count many times in a row (predictable branches)
    by_size = np.argsort(sets.sum(axis=1), kind="stable")
    sets, class_group = sets[by_size], np.argsort(by_size)[class_group.reshape(-1)]
    groups = sets.shape[0]
    grp_cls = np.argsort(class_group, kind="stable")
    grp_cls_ptr = np.concatenate([[0], np.cumsum(np.bincount(class_group, minlength=groups))])
    grp_sizes = sets.sum(axis=1)
    grp_ptr = np.concatenate([[0], np.cumsum(grp_sizes)])
    grp_teacher = np.nonzero(sets)[1]  # row-major: ascending within a group
    entries = grp_ptr[-1]
    # entry of (group g, teacher i): position of i among g's teachers
    entry_of = np.full((groups, n), -1, dtype=np.int64)
    entry_of[np.repeat(np.arange(groups), grp_sizes), grp_teacher] = np.arange(entries)
    col_entry = entry_of[class_group[class_index], teacher_index]
    ent_group = np.repeat(np.arange(groups), grp_sizes)
    alone = grp_sizes[ent_group] == 1
    tch_entry = np.lexsort((ent_group, alone, grp_teacher))  # by teacher; shared groups first, ascending
    tch_group = ent_group[tch_entry]
    tch_ptr = np.concatenate([[0], np.cumsum(np.bincount(grp_teacher, minlength=n))])
    tch_shared = np.bincount(grp_teacher[~alone], minlength=n)
    # every pair of teachers (i < j) of each group, listed pair-major
    pair_of = np.full((n, n), -1, dtype=np.int64)
    upper = np.triu_indices(n, 1)
    pair_of[upper] = np.arange(upper[0].size)
    pairs, pair_groups = [], []
    for size in np.unique(grp_sizes[grp_sizes > 1]):  # the groups of each size at once
        which = np.nonzero(grp_sizes == size)[0]
        members = grp_teacher[grp_ptr[which][:, None] + np.arange(size)]  # (groups of this size, size)
        a, b = np.triu_indices(size, 1)
        pairs.append(pair_of[members[:, a], members[:, b]].ravel())
        pair_groups.append(np.repeat(which, a.size))
    pair_index = np.concatenate(pairs) if pairs else np.zeros(0, dtype=np.int64)
    pair_group = np.concatenate(pair_groups)[np.argsort(pair_index, kind="stable")] if pairs else pair_index
    pair_ptr = np.concatenate([[0], np.cumsum(np.bincount(pair_index, minlength=upper[0].size))])
    header = np.array([n, k, nnz, groups, entries, pair_group.size])
    parts = [header, offsets, class_index, cls_ptr, cls_col, cls_teacher, grp_cls_ptr, grp_cls, grp_ptr]
    parts += [grp_teacher, col_entry, class_group, anchors, tch_ptr, tch_group, tch_shared, pair_ptr, pair_group]
    buffer = np.concatenate(parts)
    if buffer.max(initial=0) >= 2**31:
        raise ValueError(f"nnz={nnz} / K={k}: one sample's layout must fit int32 indices")
    return buffer.astype(np.int32), groups


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
            raise InputError("empty: at least one teacher is needed", argument="class_sets")
        declared = num_classes is not None or classes is not None
        sets = []
        for i, cs in enumerate(class_sets):
            if isinstance(cs, (str, bytes)) or not isinstance(cs, Sequence | torch.Tensor):
                raise TypeError(f"teacher {i}: its class set must be a sequence, got {type(cs).__name__}")
            cs = cs.tolist() if isinstance(cs, torch.Tensor) else list(cs)
            if len(cs) == 0:
                raise InputError("empty class set", teacher=i, argument="class_sets")
            sets.append(cs)

        by_index = all(_is_int(c) for cs in sets for c in cs)
        if by_index:
            if classes is not None:
                raise ValueError("classes= names the union order; it needs class names, not indices")
            self.class_sets = tuple(tuple(int(c) for c in cs) for cs in sets)
            top = max(max(cs) for cs in self.class_sets) + 1
            for i, cs in enumerate(self.class_sets):
                if min(cs) < 0:
                    raise InputError(f"negative class index {min(cs)}", teacher=i, argument="class_sets")
            if num_classes is None:
                num_classes = top
            elif num_classes < top:
                bad = next(i for i, cs in enumerate(self.class_sets) if max(cs) >= num_classes)
                raise InputError(
                    f"class index {max(self.class_sets[bad])} is out of range for num_classes={num_classes}",
                    teacher=bad,
                    argument="class_sets",
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
                    raise InputError(f"classes {missing[:5]} are not in classes=", teacher=i, argument="class_sets")
            self.class_sets = tuple(tuple(position[c] for c in cs) for cs in sets)
            self.classes = tuple(order)
            num_classes = len(order)

        for i, cs in enumerate(self.class_sets):
            if len(set(cs)) != len(cs):
                dup = next(c for c in cs if cs.count(c) > 1)
                raise InputError(f"class {self.classes[dup]!r} is listed twice", teacher=i, argument="class_sets")

        self.num_classes = int(num_classes)
        self.num_teachers = len(self.class_sets)
        mask = torch.zeros(self.num_teachers, self.num_classes, dtype=torch.bool)
        for i, cs in enumerate(self.class_sets):
            mask[i, list(cs)] = True
        self.mask = mask
        self.uncovered = tuple(torch.nonzero(~mask.any(0)).flatten().tolist())
        if self.uncovered and not declared:
            raise InputError(
                f"classes {list(self.uncovered)[:10]} are covered by no teacher and cannot be "
                "estimated; pass num_classes= to declare them (they then get zero mass)",
                argument="class_sets",
            )
        self.components = class_components(self.class_sets, self.num_classes, self.uncovered)
        self.prior: int | None = None  # the index of the alpha prior teacher, in a set made by with_prior()
        self._layouts: dict[torch.device, Layout] = {}
        self._with_prior: TeacherSet | None = None
        self._scale_components: list[list[int]] | None = None
        self._warned_disconnected = False
        self._warned_scales = False
        self._host_layout()  # now, not inside a caller's torch.compile trace

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
            host = self._layouts.get(torch.device("cpu")) or self._host_layout()
            self._layouts[device] = Layout(
                class_index=host.class_index.to(device),
                teacher_index=host.teacher_index.to(device),
                offsets=host.offsets.to(device),
                mask=host.mask.to(device),
                covered=host.covered.to(device),
                structure=host.structure.to(device),
                colmap=host.colmap.to(device),
                scale_anchor=host.scale_anchor.to(device),
                prior_mask=host.prior_mask.to(device),
                num_teachers=self.num_teachers,
                num_classes=self.num_classes,
                num_groups=host.num_groups,
            )
        return self._layouts[device]

    def _host_layout(self) -> Layout:
        mask = self.mask.numpy()
        anchors = np.zeros(self.num_teachers, dtype=np.int64)
        anchors[[component[0] for component in self.scale_components]] = 1
        if self.prior is not None:
            anchors[self.prior] = 2
        structure, groups = _structure(self.class_sets, mask, anchors)
        sizes = torch.tensor(self.sizes, dtype=torch.int64)
        offsets = torch.zeros(self.num_teachers + 1, dtype=torch.int64)
        offsets[1:] = sizes.cumsum(0)
        class_index = torch.tensor([c for cs in self.class_sets for c in cs], dtype=torch.int64)
        teacher_index = torch.repeat_interleave(torch.arange(self.num_teachers), sizes)
        colmap = torch.full((self.num_teachers, self.num_classes), -1, dtype=torch.int32)
        colmap[teacher_index, class_index] = torch.arange(class_index.numel(), dtype=torch.int32)
        layout = Layout(
            class_index=class_index,
            teacher_index=teacher_index,
            offsets=offsets,
            mask=self.mask.to(torch.float32),
            covered=self.mask.any(0),
            structure=torch.from_numpy(structure),
            colmap=colmap,
            scale_anchor=torch.from_numpy(anchors > 0),
            prior_mask=torch.arange(self.num_teachers) == (-1 if self.prior is None else self.prior),
            num_teachers=self.num_teachers,
            num_classes=self.num_classes,
            num_groups=groups,
        )
        self._layouts[torch.device("cpu")] = layout
        return layout

    def with_prior(self) -> TeacherSet:
        """This set plus a pseudo-teacher covering every covered class (the ``alpha`` prior), last
        (cached: its layouts are reused)."""
        if self._with_prior is None:
            covered = [k for k in range(self.num_classes) if k not in set(self.uncovered)]
            with_prior = TeacherSet([*self.class_sets, covered], num_classes=self.num_classes)
            # the prior changes the scale components and the anchors: rebuild what __init__ cached
            with_prior.prior = self.num_teachers
            with_prior._scale_components = None
            with_prior._layouts.clear()
            with_prior._host_layout()
            self._with_prior = with_prior
        return self._with_prior

    @property
    def scale_components(self) -> list[list[int]]:
        """Groups of teachers whose `mf-lu` scales the data fix relative to each other: teachers
        linked when they share at least two classes (the ratio of two scales is the ratio of the
        two teachers' logit differences between shared classes). The prior teacher, whose logits
        are constant, is a group of its own. Each group starts with its anchor, the teacher whose
        scale is held at 1: the one with the most classes."""
        if self._scale_components is None:
            overlap = (self.mask.double() @ self.mask.double().T).numpy()
            links = overlap >= 2
            if self.prior is not None:
                links[self.prior, :] = links[:, self.prior] = False
            seen, components = set(), []
            for start in range(self.num_teachers):
                if start in seen:
                    continue
                stack, members = [start], []
                seen.add(start)
                while stack:
                    i = stack.pop()
                    members.append(i)
                    for j in np.nonzero(links[i])[0].tolist():
                        if j not in seen and j != i:
                            seen.add(j)
                            stack.append(j)
                members.sort(key=lambda i: (-self.sizes[i], i))
                components.append(members)
            self._scale_components = components
        return self._scale_components

    def warn_if_scales_unidentifiable(self) -> None:
        """Warn once per TeacherSet when the teachers' `mf-lu` scales are not all fixed by the data."""
        groups = [c for c in self.scale_components if c != [self.prior]]
        if len(groups) <= 1 or self._warned_scales:
            return
        self._warned_scales = True
        shown = [sorted(c)[:8] + (["..."] if len(c) > 8 else []) for c in groups[:6]]
        warnings.warn(
            f"mf-lu: the teachers fall into {len(groups)} groups {shown} that share fewer than two classes "
            "with each other, so the data do not fix their scales relative to one another; each group's "
            "scale is held at that of its largest teacher (v = 1)",
            UnidentifiableScalesWarning,
            stacklevel=4,
        )

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


def class_components(class_sets, num_classes: int, uncovered=()) -> list[list[int]]:
    """Connected components of the class-overlap graph (union-find over teachers' sets), largest
    first, each in class order; classes in ``uncovered`` belong to none."""
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
