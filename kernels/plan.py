"""The sparse tables the kernels walk, built once per class-set structure on the host.

The kernels never touch a dense ``(N, K)`` map. Every per-sample pass runs over the mask's sparse
structure in one of a few fixed orders, each stored here as flat int32 arrays in **one** buffer
(:attr:`Plan.tables`) whose header gives the sections' offsets:

- *teacher passes* (sums over a teacher's packed columns or its (group, teacher) entries) walk a
  ``(BLOCK_N, BLOCK_T)`` tile of teachers by positions, from the CSR pointers ``offsets`` / ``tch_ptr``;
- *row passes* (per class, per group, per entry, per teacher pair) walk a **SELL** table: rows in
  chunks of ``BLOCK_R``; chunk ``c`` is ``width[c]`` columns of ``BLOCK_R`` indices stored column by
  column at ``base[c]`` (so that the lanes of one column load consecutive words), ``-1`` padding a
  row shorter than its chunk's width. Groups are renumbered by falling teacher count, and teacher
  pairs sorted by falling count, so that a chunk's width is close to each of its rows' lengths: the
  work of a pass is about the number of stored indices, not ``N x K``.

Groups are the classes covered by the same set of teachers: `ce` solves per group, so its Newton
iterations cost ``O(E)`` (``E`` = sum over groups of their teacher counts) and ``O(P)`` for the
Newton system (``P`` = sum over groups of their teacher pairs), not ``O(nnz)``.

The tables are built from the packed layout alone (each teacher's packed columns and their
classes) and the mf-lu scale anchors; this module imports nothing from the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# The plan buffer's header: scalar fields, then the offset of every section, in this order. The
# kernels read them by position (see _common.py, which repeats the positions as constexprs).
SCALARS = (
    "N",  # teachers (the alpha prior included)
    "K",  # classes
    "nnz",  # packed columns of one sample
    "G",  # groups
    "E",  # (group, teacher) entries
    "tmax_col",  # the most packed columns of one teacher
    "tmax_ent",  # the most entries of one teacher
    "g_chunks",  # SELL chunks of each table
    "c_chunks",
    "e_chunks",
    "gc_chunks",
    "pg_chunks",
    "pc_chunks",
    "pairs_g",  # rows of the pair tables (teacher pairs sharing a group / a class)
    "pairs_c",
    "prior",  # index of the alpha prior teacher, -1 if none
    "block_rows",  # the SELL chunk height the tables were built for
)
SECTIONS = (
    "offsets",  # (N + 1) teacher i owns packed columns offsets[i] .. offsets[i + 1]
    "class_index",  # (nnz) the class of each packed column
    "tch_ptr",  # (N + 1) teacher i owns entries tch_ptr[i] .. tch_ptr[i + 1] (teacher-major entry order)
    "ent_group",  # (E) the group of each entry, teacher-major
    "ent_teacher",  # (E) the teacher of each entry, teacher-major
    "class_group",  # (K) the group of each class
    "class_degree",  # (K) how many teachers cover each class (0: uncovered)
    "anchor",  # (N) mf-lu scale anchors: 0 free, 1 held, 2 the prior teacher
    # group SELL: rows = groups, columns = its teachers (ascending); tch = teacher, pos = entry
    "g_width",
    "g_base",
    "g_tch",
    "g_pos",
    # class SELL: rows = classes, columns = covering teachers (ascending); tch = teacher, col = packed column
    "c_width",
    "c_base",
    "c_tch",
    "c_col",
    # entry SELL: rows = entries (teacher-major), columns = the entry's packed columns
    "e_width",
    "e_base",
    "e_col",
    # group-class SELL: rows = groups, columns = their classes
    "gc_width",
    "gc_base",
    "gc_cls",
    # pair-group SELL: rows = teacher pairs i < j sharing a group, columns = those groups
    "pg_width",
    "pg_base",
    "pg_grp",
    "pg_i",  # (pairs_g) the pair's teachers
    "pg_j",
    "pg_index",  # (N * N) the row of pair (i, j) (either order), -1 if none
    # pair-class SELL: rows = teacher pairs i < j sharing a class, columns = those classes
    "pc_width",
    "pc_base",
    "pc_cls",
    "pc_coli",  # packed column of teacher i's output for the class
    "pc_colj",
    "pc_i",
    "pc_j",
    "pc_index",  # (N * N)
)
HEADER = len(SCALARS) + len(SECTIONS)


@dataclass(frozen=True)
class Plan:
    """The tables of one structure for SELL chunks of ``block_rows`` rows, on one device.

    Attributes:
        tables: the int32 buffer the kernels read (header, then the sections).
        sizes: the scalar fields of the header by name.
        block_rows: the SELL chunk height the tables were built for (a kernel's ``BLOCK_R``).
        num_teachers, num_classes: N and K.
    """

    tables: torch.Tensor
    sizes: dict
    block_rows: int
    num_teachers: int
    num_classes: int
    counts: dict = field(default_factory=dict)  # stored indices per table (the work of one pass)

    @classmethod
    def from_tables(cls, tables: torch.Tensor) -> Plan:
        """The plan of a tables buffer (its header is read on the host)."""
        head = tables[: len(SCALARS)].tolist()
        sizes = dict(zip(SCALARS, head))
        return cls(tables, sizes, sizes["block_rows"], sizes["N"], sizes["K"])


def _sell(rows: list[list[tuple[int, ...]]], block: int, fields: int) -> tuple[np.ndarray, ...]:
    """SELL arrays for ``rows`` (each a list of index tuples of ``fields`` ints): ``(width, base,
    field_0, ..., field_{fields-1})``, chunks of ``block`` rows stored column-major, -1 padded."""
    chunks = max(1, -(-len(rows) // block))
    width = np.zeros(chunks, dtype=np.int64)
    base = np.zeros(chunks, dtype=np.int64)
    for c in range(chunks):
        width[c] = max((len(r) for r in rows[c * block : (c + 1) * block]), default=0)
    base[1:] = np.cumsum(width * block)[:-1]
    total = int((width * block).sum())
    data = [np.full(total, -1, dtype=np.int64) for _ in range(fields)]
    for r, row in enumerate(rows):
        c, lane = divmod(r, block)
        for j, entry in enumerate(row):
            for f in range(fields):
                data[f][base[c] + j * block + lane] = entry[f]
    return (width, base, *data)


def build(
    offsets: torch.Tensor,
    class_index: torch.Tensor,
    num_classes: int,
    anchor: torch.Tensor | None = None,
    block_rows: int = 128,
) -> Plan:
    """The :class:`Plan` of a packed layout, on ``class_index``'s device.

    Args:
        offsets: ``(N + 1,)`` teacher ``i`` owns packed columns ``offsets[i] .. offsets[i + 1]``.
        class_index: ``(nnz,)`` the class of each packed column.
        num_classes: K.
        anchor: ``(N,)`` mf-lu scale anchors: 0 free, 1 held, 2 the alpha prior (default all 0).
        block_rows: the SELL chunk height (the kernels' ``BLOCK_R``).
    """
    offsets = offsets.detach().cpu().numpy().astype(np.int64)
    class_index = class_index.detach().cpu().numpy().astype(np.int64)
    n, k, nnz = offsets.size - 1, int(num_classes), class_index.size
    anchor = np.zeros(n, dtype=np.int64) if anchor is None else anchor.detach().cpu().numpy().astype(np.int64)
    col_teacher = np.repeat(np.arange(n), np.diff(offsets))
    mask = np.zeros((n, k), dtype=bool)
    mask[col_teacher, class_index] = True
    col_of = np.full((n, k), -1, dtype=np.int64)
    col_of[col_teacher, class_index] = np.arange(nnz)

    # groups: classes covered by the same teachers, numbered by falling teacher count (stable), so
    # that a SELL chunk's rows have similar widths
    sets, class_group = np.unique(mask.T, axis=0, return_inverse=True)
    class_group = class_group.reshape(-1)
    degree = sets.sum(axis=1)
    order = np.argsort(-degree, kind="stable")
    new_id = np.empty(order.size, dtype=np.int64)
    new_id[order] = np.arange(order.size)
    class_group = new_id[class_group]
    sets = sets[order]
    g_count = sets.shape[0]
    members = [np.flatnonzero(sets[g]) for g in range(g_count)]  # teachers ascending
    group_classes = [[] for _ in range(g_count)]
    for c in range(k):
        group_classes[class_group[c]].append(c)
    # entries (group, teacher), teacher-major: teacher i's groups ascending
    teacher_groups = [[] for _ in range(n)]
    for g in range(g_count):
        for i in members[g]:
            teacher_groups[i].append(g)
    tch_ptr = np.concatenate([[0], np.cumsum([len(x) for x in teacher_groups])]).astype(np.int64)
    entry_teacher = np.repeat(np.arange(n), np.diff(tch_ptr))
    ent_group = np.array([g for groups in teacher_groups for g in groups], dtype=np.int64)
    position = {(int(g), int(i)): p for p, (g, i) in enumerate(zip(ent_group, entry_teacher))}

    group_rows = [[(int(i), position[(g, int(i))]) for i in members[g]] for g in range(g_count)]
    group_class_rows = [[(c,) for c in group_classes[g]] for g in range(g_count)]
    class_rows = [[(int(i), int(col_of[i, c])) for i in np.flatnonzero(mask[:, c])] for c in range(k)]
    entry_cols: list[list[tuple[int, ...]]] = [[] for _ in range(ent_group.size)]
    for col in range(nnz):  # packed columns in order: each entry's columns stay in teacher order
        i = int(col_teacher[col])
        entry_cols[position[(int(class_group[class_index[col]]), i)]].append((col,))

    # teacher pairs (i < j) sharing a group, with those groups; and sharing a class, with those classes
    pg_rows, pg_pairs = [], []
    for i in range(n):
        for j in range(i + 1, n):
            shared_groups = np.flatnonzero(sets[:, i] & sets[:, j]).tolist()
            if shared_groups:
                pg_pairs.append((i, j))
                pg_rows.append([(g,) for g in shared_groups])
    shared: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    for c in range(k):
        teachers = np.flatnonzero(mask[:, c])
        for a in range(teachers.size):
            for b in range(a + 1, teachers.size):
                i, j = int(teachers[a]), int(teachers[b])
                shared.setdefault((i, j), []).append((c, int(col_of[i, c]), int(col_of[j, c])))
    pc_pairs = sorted(shared)
    pc_rows = [shared[key] for key in pc_pairs]

    def by_length(rows, pairs):
        perm = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
        return [rows[r] for r in perm], [pairs[r] for r in perm]

    pg_rows, pg_pairs = by_length(pg_rows, pg_pairs)
    pc_rows, pc_pairs = by_length(pc_rows, pc_pairs)

    def pair_index(pairs):
        index = np.full((n, n), -1, dtype=np.int64)
        for r, (i, j) in enumerate(pairs):
            index[i, j] = index[j, i] = r
        return index.reshape(-1)

    block = int(block_rows)
    g_sell = _sell(group_rows, block, 2)
    c_sell = _sell(class_rows, block, 2)
    e_sell = _sell(entry_cols, block, 1)
    gc_sell = _sell(group_class_rows, block, 1)
    pg_sell = _sell(pg_rows, block, 1)
    pc_sell = _sell(pc_rows, block, 3)
    sizes_per_teacher = np.diff(offsets)
    prior = np.flatnonzero(anchor == 2)

    sections = {
        "offsets": offsets,
        "class_index": class_index,
        "tch_ptr": tch_ptr,
        "ent_group": ent_group,
        "ent_teacher": entry_teacher,
        "class_group": class_group,
        "class_degree": mask.sum(axis=0),
        "anchor": anchor,
        "g_width": g_sell[0],
        "g_base": g_sell[1],
        "g_tch": g_sell[2],
        "g_pos": g_sell[3],
        "c_width": c_sell[0],
        "c_base": c_sell[1],
        "c_tch": c_sell[2],
        "c_col": c_sell[3],
        "e_width": e_sell[0],
        "e_base": e_sell[1],
        "e_col": e_sell[2],
        "gc_width": gc_sell[0],
        "gc_base": gc_sell[1],
        "gc_cls": gc_sell[2],
        "pg_width": pg_sell[0],
        "pg_base": pg_sell[1],
        "pg_grp": pg_sell[2],
        "pg_i": np.array([i for i, _ in pg_pairs] or [0]),
        "pg_j": np.array([j for _, j in pg_pairs] or [0]),
        "pg_index": pair_index(pg_pairs),
        "pc_width": pc_sell[0],
        "pc_base": pc_sell[1],
        "pc_cls": pc_sell[2],
        "pc_coli": pc_sell[3],
        "pc_colj": pc_sell[4],
        "pc_i": np.array([i for i, _ in pc_pairs] or [0]),
        "pc_j": np.array([j for _, j in pc_pairs] or [0]),
        "pc_index": pair_index(pc_pairs),
    }
    scalars = {
        "N": n,
        "K": k,
        "nnz": nnz,
        "G": g_count,
        "E": int(ent_group.size),
        "tmax_col": int(sizes_per_teacher.max()),
        "tmax_ent": int(np.diff(tch_ptr).max()),
        "g_chunks": g_sell[0].size,
        "c_chunks": c_sell[0].size,
        "e_chunks": e_sell[0].size,
        "gc_chunks": gc_sell[0].size,
        "pg_chunks": pg_sell[0].size,
        "pc_chunks": pc_sell[0].size,
        "pairs_g": len(pg_pairs),
        "pairs_c": len(pc_pairs),
        "prior": int(prior[0]) if prior.size else -1,
        "block_rows": block,
    }
    header = [scalars[name] for name in SCALARS]
    at = HEADER
    parts = []
    for name in SECTIONS:
        header.append(at)
        parts.append(np.asarray(sections[name], dtype=np.int64))
        at += parts[-1].size
    buffer = np.concatenate([np.asarray(header, dtype=np.int64), *parts])
    if buffer.size >= 2**31 or buffer.max(initial=0) >= 2**31:
        raise ValueError("the kernels' tables must fit int32 indices")
    counts = {
        "entries": int(ent_group.size),
        "group_sell": int((g_sell[0] * block).sum()),
        "class_sell": int((c_sell[0] * block).sum()),
        "pair_group_sell": int((pg_sell[0] * block).sum()),
        "pair_class_sell": int((pc_sell[0] * block).sum()),
        "pair_group_entries": sum(len(r) for r in pg_rows),
        "pair_class_entries": sum(len(r) for r in pc_rows),
    }
    return Plan(torch.from_numpy(buffer.astype(np.int32)), scalars, block, n, k, counts)


_CACHE: dict[tuple, tuple[torch.Tensor, Plan]] = {}


def plan_for(
    offsets: torch.Tensor,
    class_index: torch.Tensor,
    num_classes: int,
    anchor: torch.Tensor | None,
    block_rows: int = 128,
) -> Plan:
    """:func:`build` on ``class_index``'s device, cached per ``class_index`` tensor (a layout's
    tensors live as long as the layout, which is cached per TeacherSet and device)."""
    key = (id(class_index), int(block_rows), str(class_index.device))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is class_index:
        return hit[1]
    host = build(offsets, class_index, num_classes, anchor, block_rows)
    plan = Plan(
        host.tables.to(class_index.device),
        host.sizes,
        host.block_rows,
        host.num_teachers,
        host.num_classes,
        host.counts,
    )
    if len(_CACHE) > 256:  # bounds pathological use only
        _CACHE.clear()
    _CACHE[key] = (class_index, plan)
    return plan
