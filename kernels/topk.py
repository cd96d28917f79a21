"""Per-sample class sets (teachers' top-k outputs): merge each sample's listed ids and solve `sd` or
`ce` over their union, one program per sample at a time, everything on chip.

The algorithm is that of ``uhc_fast/reference/topk.py`` (the definition) and ``csrc/core/topk.h``
(the CPU core), laid out for a GPU. Per sample, the ``T = sum k_i`` slots of the teachers' rows are
one ``BLOCK_T`` vector (teacher i owns slots ``off_i .. off_i + k_i``), read from each teacher's own
``(B, k_i)`` arrays once (any strides, int32/int64 ids, any float values):

1. validate every slot and row (the checks of ``uhc_fast.topk.CHECKS``, the first failing row per
   teacher and check recorded with an atomic min); renormalise each row over its listed ids;
2. sort the slots by ``(shared id, slot)`` (``tl.sort`` on packed int64 keys): equal ids become
   runs of at most N slots, a teacher listing an id twice is two neighbours of the same teacher,
   and each run's first slot stands for a union id, gathering its run's teacher bitmask and
   evidence by ``N - 1`` look-aheads (``tl.gather``);
3. connectivity of the teachers' overlap graph by bitmask closure, the uniform prior where asked;
4. `ce`: damped Newton on the teachers' dual (N + 1 unknowns: the teachers and the prior) with the
   reference's start, capped steps, Armijo line search on F's change term by term, and its test
   (relative KKT residual and predicted step <= tol); the grounded Newton system (a weighted graph
   Laplacian of the teachers) is assembled with ``tl.dot`` and solved by positive elimination in
   registers, grounded at the last present teacher;
5. order the union by decreasing soft label (ties: increasing id) with a second sort of packed
   keys, and write the first ``width`` columns (renormalised when the union was larger).

Teachers: at most :data:`MAX_TEACHERS` (a bit each, plus the prior); ``uhc_fast.topk`` falls back to
the torch reference beyond. The per-teacher arrays are separate pointer arguments (no packing pass
on the host: the inputs are read once). Float64 answers order ties to within ``2**-36`` relative
(the low bits of the float64 sort key hold the position).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_TEACHERS = 8
# the largest BLOCK_T (power of two >= sum k_i) the kernel takes: beyond, uhc_fast.topk runs the
# torch reference (a sample's slots and union live in registers)
MAX_SLOTS = 512
# csrc/core/topk.h / uhc_fast/topk_inputs.py codes
PROBS, LOGPROBS, LOGITS = 0, 1, 2
SD, CE = 0, 1
NUM_CHECKS = 6
_NO_ROW = torch.iinfo(torch.int64).max
_TABLE_WIDTH = 8  # per teacher: offset, k, ids row/col strides, values row/col strides, map size, unused
# constants of uhc_fast/constants.py (the kernel takes no package imports; tests compare them)
ARMIJO = 1e-4
MAX_HALVINGS = 40
MAX_LOG_STEP = 2.0
CONVERGED_LOG_STEP = 0.25
# the same, as the kernel sees them
_PROBS = tl.constexpr(PROBS)
_LOGPROBS = tl.constexpr(LOGPROBS)
_SD = tl.constexpr(SD)
_CHECKS = tl.constexpr(NUM_CHECKS)
_ARMIJO = tl.constexpr(ARMIJO)
_HALVINGS = tl.constexpr(MAX_HALVINGS)
_MAX_STEP = tl.constexpr(MAX_LOG_STEP)
_CONVERGED_STEP = tl.constexpr(CONVERGED_LOG_STEP)


def num_warps(num_teachers: int, block_t: int) -> int:
    """Warps per program, as ptxas's reports chose them (no spills at every supported shape):
    8 for more than 4 teachers up to 512 slots, else 4."""
    return 8 if num_teachers > 4 and block_t <= 512 else 4


def block_slots(total: int) -> int:
    """BLOCK_T for ``total = sum k_i`` slots."""
    return max(16, triton.next_power_of_2(max(total, 1)))


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_function(fn):
    # plain Python under the interpreter (each jitted call re-patches triton.language there)
    return fn if interpreting() else triton.jit(fn)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@_device_function
def _expm1(x):
    """``exp(x) - 1`` to full relative precision near 0 (Kahan's trick)."""
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(tl.abs(x) < 1.0, um1 * x / tl.log(tl.where(u == 1.0, 2.0, u)), um1))


@_device_function
def _log1p(x):
    """``log(1 + x)`` to full relative precision near 0."""
    w = 1.0 + x
    return tl.where(w == 1.0, x, tl.log(w) * x / tl.where(w == 1.0, 1.0, w - 1.0))


@_device_function
def _flag(condition):
    """A scalar comparison as a well-formed int1 (the interpreter keeps a float scalar's comparison
    in the float's dtype, which its bitwise ops then reject; compiled, this folds away)."""
    return tl.where(condition, 1, 0) != 0


@_device_function
def _positive(x):
    """``x`` where it is > 0, else 1 (a safe divisor)."""
    return tl.where(x > 0, x, 1.0)


@_device_function
def _take(
    s,
    i: tl.constexpr,
    row,
    ids_ptr,
    vals_ptr,
    map_ptr,
    table_ptr,
    tol_ptr,
    vocab_size,
    acc,
    KIND: tl.constexpr,
    HAS_MAP: tl.constexpr,
    DT: tl.constexpr,
):
    """Teacher i's row into its slots of the accumulated per-slot vectors ``acc``."""
    raw, val, tch, shared, bad, kind, tolv = acc
    base = table_ptr + i * 8
    off = tl.load(base + 0)
    k = tl.load(base + 1)
    mine = (s >= off) & (s < off + k)
    j = (s - off).to(tl.int64)
    x = tl.load(ids_ptr + row * tl.load(base + 2) + j * tl.load(base + 3), mask=mine, other=-1).to(tl.int64)
    v = tl.load(vals_ptr + row * tl.load(base + 4) + j * tl.load(base + 5), mask=mine, other=0.0).to(DT)
    wrong = mine & (x < -1)
    y = x
    if HAS_MAP:
        size = tl.load(base + 6)
        wrong = wrong | (mine & (x >= size))
        inside = mine & (x >= 0) & (x < size)
        y = tl.where(inside, tl.load(map_ptr + tl.where(inside, x, 0), mask=inside, other=-1), -1)
    y = tl.where(wrong, -1, y)
    beyond = mine & (y >= vocab_size)
    wrong = wrong | beyond
    y = tl.where(beyond, -1, y)
    return (
        tl.where(mine, x, raw),
        tl.where(mine, v, val),
        tl.where(mine, i, tch),
        tl.where(mine, y, shared),
        bad | wrong,
        tl.where(mine, KIND, kind),
        tl.where(mine, tl.load(tol_ptr + i).to(DT), tolv),
    )


@_device_function
def _ground_solve(links, ground, rhs, active, BLOCK_N: tl.constexpr, n_nodes):
    """Solve ``(diag(sum_j L_ij + g_i) - L) x = b`` over the ``active`` nodes by positive elimination
    (csrc/core/linalg.h: grounded_laplacian_solve), in index order; inactive nodes get 0."""
    idx = tl.arange(0, BLOCK_N)
    rows = idx[:, None]
    pivots = tl.zeros((BLOCK_N,), dtype=links.dtype)
    for k in range(0, n_nodes):
        row_k = tl.sum(tl.where(rows == k, links, 0.0), axis=0)
        later = active & (idx > k)
        is_k = idx == k
        act_k = tl.sum(tl.where(is_k & active, 1, 0), axis=0) > 0
        d = tl.sum(tl.where(later, row_k, 0.0), axis=0) + tl.sum(tl.where(is_k, ground, 0.0), axis=0)
        good = act_k & _flag(d > 0)
        inv = tl.where(good, 1.0 / tl.where(good, d, 1.0), 0.0)
        f = tl.where(later, row_k * inv, 0.0)
        links = links + tl.where(later[:, None] & later[None, :], f[:, None] * row_k[None, :], 0.0)
        ground = ground + f * tl.sum(tl.where(is_k, ground, 0.0), axis=0)
        rhs = rhs + f * tl.sum(tl.where(is_k, rhs, 0.0), axis=0)
        pivots = tl.where(is_k, inv, pivots)
    x = tl.zeros((BLOCK_N,), dtype=links.dtype)
    for kk in range(0, n_nodes):
        k = n_nodes - 1 - kk
        is_k = idx == k
        row_k = tl.sum(tl.where(rows == k, links, 0.0), axis=0)
        acc = tl.sum(tl.where(is_k, rhs, 0.0), axis=0) + tl.sum(tl.where(active & (idx > k), row_k * x, 0.0), axis=0)
        x = tl.where(is_k & active, acc * tl.sum(tl.where(is_k, pivots, 0.0), axis=0), x)
    return x


@triton.jit
def _topk_kernel(
    ids0,
    ids1,
    ids2,
    ids3,
    ids4,
    ids5,
    ids6,
    ids7,  # teachers' (B, k_i) ids (int32/int64), in table order
    vals0,
    vals1,
    vals2,
    vals3,
    vals4,
    vals5,
    vals6,
    vals7,  # their (B, k_i) values, any float dtype
    map0,
    map1,
    map2,
    map3,
    map4,
    map5,
    map6,
    map7,  # int64 vocabulary maps (teacher id -> shared id), if any
    table_ptr,  # (MAX_TEACHERS, 8) int64: slot offset, k, ids strides, values strides, map size
    tol_ptr,  # (MAX_TEACHERS,) float64: how far listed probabilities may sum above 1, per teacher
    weights_ptr,  # (MAX_TEACHERS + 1,) float64 teacher weights, then the prior's weight
    out_ids_ptr,  # (B, width) int64 union ids by decreasing soft label, -1-padded
    out_soft_ptr,  # (B, width) DT soft labels
    union_ptr,  # (B,) int32 union sizes
    split_ptr,  # (B,) int8 disconnected samples
    kept_ptr,  # (B,) DT mass of the kept columns before renormalisation
    iterations_ptr,  # (B,) int32 Newton steps (ce)
    converged_ptr,  # (B,) int8 (ce)
    residual_ptr,  # (B,) DT relative KKT residual (ce)
    step_ptr,  # (B,) DT predicted change of the last Newton step (ce)
    abs_residual_ptr,  # (B,) DT absolute KKT residual (ce)
    errors_ptr,  # (N, 6) int64 first failing row per teacher and check (INT64_MAX: none)
    batch,
    width,  # output columns
    vocab_size,  # shared ids must be below it (a huge value: no bound)
    alpha_given,  # 1: the prior applies to every sample; 0: only to disconnected ones
    tol,
    max_iter,
    NT: tl.constexpr,  # teachers
    KINDS: tl.constexpr,  # 2 bits per teacher: PROBS, LOGPROBS, LOGITS
    MAPS: tl.constexpr,  # bit i: teacher i has a vocabulary map
    METHOD: tl.constexpr,  # SD or CE
    DT: tl.constexpr,  # computation and answer dtype
    BLOCK_T: tl.constexpr,  # power of two >= sum k_i
    SLOT_BITS: tl.constexpr,  # log2(BLOCK_T)
    BLOCK_N: tl.constexpr,  # power of two >= NT + 1, >= 16 (tl.dot)
    NT_MAX: tl.constexpr,  # MAX_TEACHERS
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    s = tl.arange(0, BLOCK_T)
    nidx = tl.arange(0, BLOCK_N)
    prior_bit = tl.full((), 1, tl.int64) << NT
    w_real = tl.load(weights_ptr + nidx, mask=nidx < NT, other=0.0).to(DT)
    kind_n = (KINDS >> (2 * nidx)) & 3
    tol_n = tl.load(tol_ptr + nidx, mask=nidx < NT, other=0.0).to(DT)
    big = tl.full((), 9223372036854775807, tl.int64)
    INF: tl.constexpr = float("inf")
    alpha = tl.load(weights_ptr + NT_MAX).to(DT)  # the prior's weight (given, or the one for disconnected samples)
    for row32 in range(pid, batch, programs):
        row = tl.cast(row32, tl.int64)
        # ---------------------------------------------------------------- 1. read and validate
        acc = (
            tl.full((BLOCK_T,), -1, tl.int64),
            tl.zeros((BLOCK_T,), DT),
            tl.full((BLOCK_T,), -1, tl.int32),
            tl.full((BLOCK_T,), -1, tl.int64),
            tl.zeros((BLOCK_T,), tl.int1),
            tl.zeros((BLOCK_T,), tl.int32),
            tl.zeros((BLOCK_T,), DT),
        )
        acc = _take(s, 0, row, ids0, vals0, map0, table_ptr, tol_ptr, vocab_size, acc, KINDS & 3, MAPS & 1, DT)
        if NT > 1:
            acc = _take(
                s, 1, row, ids1, vals1, map1, table_ptr, tol_ptr, vocab_size, acc, (KINDS >> 2) & 3, (MAPS >> 1) & 1, DT
            )
        if NT > 2:
            acc = _take(
                s, 2, row, ids2, vals2, map2, table_ptr, tol_ptr, vocab_size, acc, (KINDS >> 4) & 3, (MAPS >> 2) & 1, DT
            )
        if NT > 3:
            acc = _take(
                s, 3, row, ids3, vals3, map3, table_ptr, tol_ptr, vocab_size, acc, (KINDS >> 6) & 3, (MAPS >> 3) & 1, DT
            )
        if NT > 4:
            acc = _take(
                s, 4, row, ids4, vals4, map4, table_ptr, tol_ptr, vocab_size, acc, (KINDS >> 8) & 3, (MAPS >> 4) & 1, DT
            )
        if NT > 5:
            acc = _take(
                s,
                5,
                row,
                ids5,
                vals5,
                map5,
                table_ptr,
                tol_ptr,
                vocab_size,
                acc,
                (KINDS >> 10) & 3,
                (MAPS >> 5) & 1,
                DT,
            )
        if NT > 6:
            acc = _take(
                s,
                6,
                row,
                ids6,
                vals6,
                map6,
                table_ptr,
                tol_ptr,
                vocab_size,
                acc,
                (KINDS >> 12) & 3,
                (MAPS >> 6) & 1,
                DT,
            )
        if NT > 7:
            acc = _take(
                s,
                7,
                row,
                ids7,
                vals7,
                map7,
                table_ptr,
                tol_ptr,
                vocab_size,
                acc,
                (KINDS >> 14) & 3,
                (MAPS >> 7) & 1,
                DT,
            )
        _raw, val, tch, shared, bad, kind, tolv = acc
        listed = shared >= 0
        mem = (tch[None, :] == nidx[:, None]) & listed[None, :]  # (BLOCK_N, BLOCK_T) slots by teacher
        probs = kind == _PROBS
        nan_s = listed & ((val != val) | (val == INF) | (probs & (val == -INF)))
        oor_s = listed & ((probs & (val < 0)) | ((kind == _LOGPROBS) & (val > tolv)))
        count_n = tl.sum(mem.to(tl.int32), axis=1)
        top_n = tl.max(tl.where(mem, val, -INF), axis=1)
        finite_top = tl.where(top_n > -INF, top_n, 0.0)
        top_s = tl.gather(finite_top, tl.maximum(tch, 0), 0)
        e_s = tl.where(listed & ~nan_s, tl.where(probs, val, tl.exp(val - top_s)), 0.0)
        sum_n = tl.sum(tl.where(mem, e_s[None, :], 0.0), axis=1)
        total_n = tl.where(kind_n == _PROBS, sum_n, tl.exp(finite_top) * sum_n)
        nomass_n = (count_n > 0) & tl.where(kind_n == _PROBS, sum_n == 0, top_n == -INF)
        over_n = ((kind_n == _PROBS) | (kind_n == _LOGPROBS)) & (total_n - 1 > tol_n) & ~nomass_n
        bad_n = tl.max(tl.where((tch[None, :] == nidx[:, None]) & bad[None, :], 1, 0), axis=1) > 0
        nan_n = tl.max(tl.where(mem & nan_s[None, :], 1, 0), axis=1) > 0
        oor_n = tl.max(tl.where(mem & oor_s[None, :], 1, 0), axis=1) > 0
        p_s = e_s / tl.where(listed, tl.gather(tl.where(sum_n > 0, sum_n, 1.0), tl.maximum(tch, 0), 0), 1.0)

        # ---------------------------------------------------------------- 2. the union, by sorting
        key = tl.where(listed, (shared << SLOT_BITS) | s.to(tl.int64), big)
        skey = tl.sort(key, 0)
        sl = skey != big
        sid = skey >> SLOT_BITS
        sslot = (skey & (BLOCK_T - 1)).to(tl.int32)
        before = tl.maximum(s - 1, 0)
        new = sl & ((s == 0) | (tl.gather(sid, before, 0) != sid))
        stch = tl.where(sl, tl.gather(tch, sslot, 0), -1)
        dup_s = sl & ~new & (tl.gather(stch, before, 0) == stch)
        dup_n = tl.max(tl.where((stch[None, :] == nidx[:, None]) & dup_s[None, :], 1, 0), axis=1) > 0
        first = tl.where(
            bad_n,
            0,
            tl.where(dup_n, 1, tl.where(nan_n, 2, tl.where(oor_n, 3, tl.where(nomass_n, 4, tl.where(over_n, 5, 6))))),
        )
        failing = (first < _CHECKS) & (nidx < NT)
        tl.atomic_min(
            errors_ptr + nidx * _CHECKS + tl.where(failing, first, 0),
            row + tl.zeros((BLOCK_N,), tl.int64),
            mask=failing,
        )
        row_bad = tl.max(failing.to(tl.int32), axis=0) > 0

        bit_s = tl.where(sl, tl.full((BLOCK_T,), 1, tl.int64) << tl.maximum(stch, 0).to(tl.int64), 0)
        w_s = tl.gather(w_real, tl.maximum(stch, 0), 0)
        se = tl.where(sl, w_s * tl.gather(p_s, sslot, 0), 0.0)  # each slot's evidence w_i p_il, sorted
        mask_u = bit_s
        n_u = se
        for d in tl.static_range(1, NT):
            ahead = tl.minimum(s + d, BLOCK_T - 1)
            same = (s + d < BLOCK_T) & (tl.gather(sid, ahead, 0) == sid) & tl.gather(sl, ahead, 0)
            mask_u = mask_u | tl.where(same, tl.gather(bit_s, ahead, 0), 0)
            n_u = n_u + tl.where(same, tl.gather(se, ahead, 0), 0.0)
        mask_u = tl.where(new, mask_u, 0)
        n_u = tl.where(new, n_u, 0.0)
        union = tl.sum(new.to(tl.int32), axis=0)
        start = tl.associative_scan(tl.where(new, s, 0), 0, _max)  # each slot's union id's position

        # ---------------------------------------------------------------- 3. connectivity, prior
        present = tl.reduce(bit_s, 0, _or)
        reached = present & (-present)
        for _ in tl.static_range(NT):
            hit = new & ((mask_u & reached) != 0)
            reached = reached | tl.reduce(tl.where(hit, mask_u, 0), 0, _or)
        split = reached != present
        a_row = tl.where((alpha_given != 0) | split, alpha, 0.0)
        prior = _flag(a_row > 0) & (union > 0)
        fill = tl.where(prior, a_row / tl.maximum(union, 1).to(DT), 0.0)
        mask_f = tl.where(new, mask_u | tl.where(prior, prior_bit, 0), 0)
        n_f = tl.where(new, n_u + fill, 0.0)

        iterations = 0
        relative = tl.zeros((), DT)
        predicted = tl.zeros((), DT)
        absolute = tl.zeros((), DT)
        done = union == 0
        if METHOD == _SD:
            q = n_f / _positive(tl.sum(n_f, axis=0))
        else:
            # ------------------------------------------------------------ 4. ce: Newton on the dual
            memb = ((mask_f[None, :] >> nidx[:, None].to(tl.int64)) & 1) != 0  # (BLOCK_N, BLOCK_T)
            has = new & (n_f > 0)
            w_n = tl.where((nidx < NT) & (((present >> nidx.to(tl.int64)) & 1) != 0), w_real, 0.0)
            w_n = tl.where((nidx == NT) & prior, a_row, w_n)
            pres = w_n > 0
            total_w = tl.sum(w_n, axis=0)
            sum_n = _positive(tl.sum(n_f, axis=0))
            share = tl.sum(tl.where(memb, n_f[None, :], 0.0), axis=1) / sum_n
            t = tl.where(pres, tl.log(tl.where(pres, w_n, 1.0)) - tl.log(tl.where(pres, share, 1.0)), 0.0)
            ground = tl.max(tl.where(pres, nidx, -1), axis=0)
            active = pres & (nidx != ground)
            shared_u = (mask_f & (mask_f - 1)) != 0  # listed by two teachers or more (the prior counts)
            slot_shared = sl & tl.gather(shared_u, start, 0)
            prior_n = nidx == NT
            eye = nidx[:, None] == nidx[None, :]
            running = (union > 0) & ~row_bad
            r = tl.zeros((BLOCK_N,), DT)
            inv = tl.zeros((BLOCK_T,), DT)
            x = tl.zeros((BLOCK_T,), DT)
            z = tl.full((), 1.0, DT)
            while running:
                top = tl.max(tl.where(pres, t, -INF), axis=0)
                r = tl.where(pres, tl.exp(t - top), 0.0)
                dd = tl.sum(tl.where(memb, r[:, None], 0.0), axis=0)
                inv = tl.where(new, 1.0 / _positive(dd), 0.0)
                x = tl.where(has, n_f * inv, 0.0)
                z = tl.sum(x, axis=0)
                mass = tl.sum(tl.where(memb, x[None, :], 0.0), axis=1)
                wm = tl.where(pres, w_n / tl.where(pres, mass, 1.0), 0.0)
                kkt = tl.sum(tl.where(memb, wm[:, None], 0.0), axis=0) * inv
                gap = tl.where(has, tl.abs(kkt - 1.0), 0.0)
                relative = tl.max(gap, axis=0)
                absolute = tl.max(n_f * gap, axis=0) / total_w
                # gradient: each listed slot's difference r_i x_l - e_il (0 for ids one teacher lists)
                x_s = tl.gather(x, start, 0)
                r_s = tl.gather(r, tl.maximum(stch, 0), 0)
                term = tl.where(slot_shared, r_s * x_s - se, 0.0)
                grad = tl.sum(tl.where(stch[None, :] == nidx[:, None], term[None, :], 0.0), axis=1)
                r_prior = tl.sum(tl.where(prior_n, r, 0.0), axis=0)
                grad_prior = tl.sum(tl.where(new & shared_u & prior, r_prior * x - fill, 0.0), axis=0)
                grad = tl.where(prior_n & prior, grad_prior, grad)
                # the Newton system: links_ij = r_i r_j sum_l [i, j list l] x_l / D_l
                weighted = tl.where(memb, (x * inv)[None, :], 0.0)
                curvature = tl.dot(weighted, tl.trans(tl.where(memb, 1.0, 0.0).to(DT)), input_precision="ieee")
                links = tl.where(eye | ~(pres[:, None] & pres[None, :]), 0.0, r[:, None] * r[None, :] * curvature)
                to_ground = tl.sum(tl.where(nidx[None, :] == ground, links, 0.0), axis=1)
                links = tl.where((nidx[:, None] == ground) | (nidx[None, :] == ground), 0.0, links)
                step = _ground_solve(links, to_ground, -grad, active, BLOCK_N, NT + 1)
                longest = tl.max(tl.abs(step), axis=0)
                step = step * (_MAX_STEP / tl.maximum(longest, _MAX_STEP))
                m_u = tl.sum(tl.where(memb, (r * step)[:, None], 0.0), axis=0) * inv
                q = x / z
                c = tl.sum(q * m_u, axis=0)
                predicted = tl.max(tl.where(new, tl.abs(q * (c - m_u)), 0.0), axis=0)
                done = _flag(relative <= tol) & _flag(predicted <= tol) & _flag(longest <= _CONVERGED_STEP)
                slope = tl.sum(grad * step, axis=0)
                searching = _flag(slope < 0) & ~done & (iterations < max_iter)
                # backtracking from the full step; a converged row may take only the full (tiny) step
                a = tl.full((), 1.0, DT)
                taken = tl.zeros((), DT)
                trying = searching | done
                halvings = 0
                while trying & (halvings < _HALVINGS):
                    spread = tl.sum(tl.where(memb, (r * _expm1(a * step))[:, None], 0.0), axis=0) * inv
                    change = a * slope + tl.sum(tl.where(has, n_f * (_log1p(spread) - a * m_u), 0.0), axis=0)
                    ok = _flag(change <= _ARMIJO * a * slope) & _flag(change == change) & _flag(tl.abs(change) < INF)
                    taken = tl.where(ok, a, taken)
                    trying = ~ok & ~done
                    a = a * 0.5
                    halvings += 1
                accepted = _flag(taken > 0)
                t = t + taken * step
                iterations += (accepted & ~done).to(tl.int32)
                running = searching & accepted
            top = tl.max(tl.where(pres, t, -INF), axis=0)
            r = tl.where(pres, tl.exp(t - top), 0.0)
            dd = tl.sum(tl.where(memb, r[:, None], 0.0), axis=0)
            x = tl.where(has, n_f / _positive(dd), 0.0)
            q = x / _positive(tl.sum(x, axis=0))
            tl.store(iterations_ptr + row, iterations)
            tl.store(converged_ptr + row, (done | (union == 0)).to(tl.int8))
            tl.store(residual_ptr + row, relative)
            tl.store(step_ptr + row, predicted)
            tl.store(abs_residual_ptr + row, absolute)

        # ---------------------------------------------------------------- 5. ordered output
        q = tl.where(new, q, 0.0)
        if DT == tl.float32:
            bits = q.to(tl.int32, bitcast=True).to(tl.int64)
            okey = tl.where(new, (bits << 32) | (4294967295 - s.to(tl.int64)), -1)
        else:
            bits = q.to(tl.int64, bitcast=True)
            okey = tl.where(new, ((bits >> SLOT_BITS) << SLOT_BITS) | (BLOCK_T - 1 - s).to(tl.int64), -1)
        okey = tl.sort(okey, 0, descending=True)
        if DT == tl.float32:
            at = (4294967295 - (okey & 4294967295)).to(tl.int32)
        else:
            at = (BLOCK_T - 1 - (okey & (BLOCK_T - 1))).to(tl.int32)
        at = tl.minimum(tl.maximum(at, 0), BLOCK_T - 1)
        size = tl.where(row_bad, 0, union)
        kept = tl.minimum(size, width)
        inside = s < kept
        out_q = tl.where(inside, tl.gather(q, at, 0), 0.0)
        out_id = tl.where(inside, tl.gather(sid, at, 0), -1)
        mass = tl.sum(out_q, axis=0)
        truncated = size > width
        out_q = tl.where(truncated, out_q / _positive(mass), out_q)
        cols = s.to(tl.int64)
        tl.store(out_ids_ptr + row * width + cols, out_id, mask=cols < width)
        tl.store(out_soft_ptr + row * width + cols, out_q.to(DT), mask=cols < width)
        for c0 in range(BLOCK_T, width, BLOCK_T):
            more = c0 + cols
            tl.store(out_ids_ptr + row * width + more, tl.full((BLOCK_T,), -1, tl.int64), mask=more < width)
            tl.store(out_soft_ptr + row * width + more, tl.zeros((BLOCK_T,), DT), mask=more < width)
        tl.store(union_ptr + row, size)
        tl.store(split_ptr + row, (split & ~row_bad & (size > 0)).to(tl.int8))
        tl.store(kept_ptr + row, tl.where(size > 0, tl.where(truncated, mass, 1.0), 0.0).to(DT))


_ID_DTYPES = (torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def topk(
    ids: list[torch.Tensor],
    values: list[torch.Tensor],
    kinds: list[int],
    maps: list[torch.Tensor | None],
    weights: torch.Tensor,
    sum_tolerance: list[float],
    *,
    method: int,
    width: int,
    alpha: float,
    alpha_given: bool,
    vocab_size: int | None,
    tol: float,
    max_iter: int,
    programs: int | None = None,
) -> dict[str, torch.Tensor]:
    """Merge and solve ``B`` samples of ``N <= MAX_TEACHERS`` teachers' top-k rows.

    Args:
        ids, values: per teacher ``(B, k_i)`` int32/int64 ids (-1: unused slot) and float values
            on one device; ``kinds`` their codes (PROBS, LOGPROBS, LOGITS); ``maps`` per teacher
            None or an int64 ``(V_i,)`` vocabulary map (checked by the caller).
        weights: ``(N,)`` teacher weights; ``sum_tolerance``: per teacher, how far its listed
            probabilities may sum above 1.
        method: SD or CE; width: output columns; alpha, alpha_given: the prior (see the kernel);
        vocab_size: shared ids must be below it (None: no bound); tol, max_iter: `ce`'s test.
        programs: persistent programs (default: a few per SM, or 1 under the interpreter).

    Returns:
        ``ids`` (B, width) int64, ``soft`` (B, width), ``union`` (B,) int32, ``disconnected`` (B,)
        bool, ``kept`` (B,), ``iterations`` (B,) int32, ``converged`` (B,) bool, ``residual``,
        ``step``, ``abs_residual`` (B,), ``errors`` (N, 6) int64 (-1: no failing row): the
        answers in float64 if any values are float64, else float32.
    """
    n = len(ids)
    if not 1 <= n <= MAX_TEACHERS:
        raise ValueError(f"the top-k kernel takes 1 to {MAX_TEACHERS} teachers, got {n}")
    device = ids[0].device
    batch = ids[0].shape[0]
    for i, (x, v) in enumerate(zip(ids, values, strict=True)):
        if x.dtype not in _ID_DTYPES or v.dtype not in _VALUE_DTYPES or x.shape != v.shape or x.dim() != 2:
            raise ValueError(
                f"teacher {i}: expected (B, k) int32/int64 ids and float values, "
                f"got {x.dtype} {tuple(x.shape)}, {v.dtype} {tuple(v.shape)}"
            )
        if x.device != device or v.device != device or x.shape[0] != batch:
            raise ValueError(f"teacher {i}: every array must be on {device} with {batch} rows")
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    total = sum(int(x.shape[1]) for x in ids)
    block_t = block_slots(total)
    if block_t > MAX_SLOTS:
        raise ValueError(f"{total} slots per sample: the top-k kernel takes at most {MAX_SLOTS}")
    block_n = max(16, triton.next_power_of_2(n + 1))
    out = {
        "ids": torch.empty(batch, width, dtype=torch.int64, device=device),
        "soft": torch.empty(batch, width, dtype=dtype, device=device),
        "union": torch.empty(batch, dtype=torch.int32, device=device),
        "disconnected": torch.empty(batch, dtype=torch.int8, device=device),
        "kept": torch.empty(batch, dtype=dtype, device=device),
        "iterations": torch.zeros(batch, dtype=torch.int32, device=device),
        "converged": torch.zeros(batch, dtype=torch.int8, device=device),
        "residual": torch.zeros(batch, dtype=dtype, device=device),
        "step": torch.zeros(batch, dtype=dtype, device=device),
        "abs_residual": torch.zeros(batch, dtype=dtype, device=device),
        "errors": torch.full((n, NUM_CHECKS), _NO_ROW, dtype=torch.int64, device=device),
    }
    if batch > 0:
        table = torch.zeros(MAX_TEACHERS, _TABLE_WIDTH, dtype=torch.int64)
        offset = 0
        for i, (x, v, m) in enumerate(zip(ids, values, maps, strict=True)):
            k = int(x.shape[1])
            table[i, :7] = torch.tensor(
                [offset, k, x.stride(0), x.stride(1), v.stride(0), v.stride(1), 0 if m is None else m.numel()]
            )
            offset += k
        table = table.to(device)
        tolerance = torch.zeros(MAX_TEACHERS, dtype=torch.float64)
        tolerance[:n] = torch.tensor(sum_tolerance, dtype=torch.float64)
        w = torch.zeros(MAX_TEACHERS + 1, dtype=torch.float64)
        w[:n] = weights.double().cpu()
        w[MAX_TEACHERS] = float(alpha)
        kinds_code = sum(int(k) << (2 * i) for i, k in enumerate(kinds))
        maps_code = sum(1 << i for i, m in enumerate(maps) if m is not None)
        pad = lambda xs, fill: list(xs) + [fill] * (MAX_TEACHERS - len(xs))
        map_args = [m if m is not None else table for m in maps]
        if programs is None:
            if device.type == "cuda":
                programs = torch.cuda.get_device_properties(device).multi_processor_count * 8
            else:
                programs = 1
        grid = (max(1, min(batch, programs)),)
        _topk_kernel[grid](
            *pad(ids, ids[0]),
            *pad(values, values[0]),
            *pad(map_args, table),
            table,
            tolerance.to(device),
            w.to(device),
            out["ids"],
            out["soft"],
            out["union"],
            out["disconnected"],
            out["kept"],
            out["iterations"],
            out["converged"],
            out["residual"],
            out["step"],
            out["abs_residual"],
            out["errors"],
            batch,
            width,
            (1 << 62) if vocab_size is None else int(vocab_size),
            int(bool(alpha_given)),
            float(tol),
            int(max_iter),
            NT=n,
            KINDS=kinds_code,
            MAPS=maps_code,
            METHOD=method,
            DT=tl.float64 if dtype == torch.float64 else tl.float32,
            BLOCK_T=block_t,
            SLOT_BITS=block_t.bit_length() - 1,
            BLOCK_N=block_n,
            NT_MAX=MAX_TEACHERS,
            num_warps=num_warps(n, block_t),
        )
    out["errors"] = torch.where(out["errors"] == _NO_ROW, -1, out["errors"])
    out["disconnected"] = out["disconnected"].bool()
    out["converged"] = out["converged"].bool()
    return out


# ---------------------------------------------------------------------- ahead-of-time check
def compile_check(
    num_teachers: int = 4,
    slots: int = 256,
    input_dtype: torch.dtype = torch.float32,
    method: int = CE,
    capability: int = 90,
    warps: int | None = None,
) -> dict:
    """Compile the kernel for ``sm_<capability>`` without a GPU (Triton's full pipeline to PTX,
    then ptxas ``-v``) and return ptxas's report: registers, spill stores and loads, stack bytes.

    ``slots`` is ``sum k_i`` (it sets BLOCK_T); ``warps`` defaults to what a launch uses. Must run
    without ``TRITON_INTERPRET``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .aot import ptxas_stats

    if interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile")
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    answer = "fp64" if input_dtype == torch.float64 else "fp32"
    block_t = block_slots(slots)
    consts = {
        "NT": num_teachers,
        "KINDS": 0,
        "MAPS": 0,
        "METHOD": method,
        "DT": tl.float64 if answer == "fp64" else tl.float32,
        "BLOCK_T": block_t,
        "SLOT_BITS": block_t.bit_length() - 1,
        "BLOCK_N": max(16, triton.next_power_of_2(num_teachers + 1)),
        "NT_MAX": MAX_TEACHERS,
    }
    types = {
        "table_ptr": "*i64",
        "tol_ptr": "*fp64",
        "weights_ptr": "*fp64",
        "out_ids_ptr": "*i64",
        "union_ptr": "*i32",
    }
    types.update(
        split_ptr="*i8", iterations_ptr="*i32", converged_ptr="*i8", errors_ptr="*i64", batch="i32", width="i32"
    )
    types.update(vocab_size="i64", alpha_given="i32", tol="fp32", max_iter="i32")
    signature = {}
    for name in _topk_kernel.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name.startswith("ids") or name.startswith("map"):
            signature[name] = "*i64"
        elif name.startswith("vals"):
            signature[name] = "*" + names[input_dtype]
        elif name in types:
            signature[name] = types[name]
        else:  # the answers
            signature[name] = "*" + answer
    src = ASTSource(_topk_kernel, signature, constexprs=consts)
    warps = num_warps(num_teachers, block_t) if warps is None else warps
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
    return ptxas_stats(compiled.asm["ptx"], capability)
