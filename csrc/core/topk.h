// Per-sample class sets (top-k outputs): each teacher lists, per sample, its own ids in a shared
// vocabulary with (renormalised) probabilities over them. Per sample the union of the listed ids
// plays the role of the K classes and the problem is dense `ce` (or `sd`) over that union
// (../shared/uhc-math.md, "Per-sample class sets"). uhc_fast/topk_inputs.py is the Python side and
// uhc_fast/reference/topk.py the definition of what is computed here.
//
// One sample at a time, in one thread's scratch:
//   1. read every teacher's row (ids through its vocabulary map, values in any float dtype),
//      validate it, and merge the ids into the union with an open-addressing table; each union id
//      gets the bitmask of the teachers listing it (a teacher listing an id twice is an error);
//   2. group the union's ids by bitmask (at most 2^N - 1 groups), decide connectivity of the
//      teachers' overlap graph, and add the uniform prior teacher where asked;
//   3. build the per-sample `Structure` (the sections CeSolver reads) and solve it with the dense
//      solver, CeSolver<1, double>: the same Newton math as `ce`, one lane of doubles;
//   4. write the union's ids sorted by decreasing soft label (ties by increasing id), -1-padded.
// Work per sample: O(sum k_i) for the merge, O(E + G) per Newton step, O(U log U) for the sort.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "ce.h"

namespace UHC_NAMESPACE {

// What a teacher's values are (uhc_fast/topk_inputs.py: KIND_CODES).
enum TopkKind : int { kTopkProbs = 0, kTopkLogprobs = 1, kTopkLogits = 2 };
// The checks of a teacher's row, in the order uhc_fast/topk_inputs.py (CHECKS) reports them.
enum TopkCheck : int {
  kBadId = 0,       // an id below -1, beyond the vocabulary map, or >= vocab_size
  kDuplicate = 1,   // an id listed twice (after the vocabulary map)
  kNaN = 2,         // NaN or +Inf (and -Inf among probabilities)
  kOutOfRange = 3,  // a negative probability, a log-probability above 0
  kNoMass = 4,      // every listed probability is zero (every log-value -Inf)
  kSumOver = 5,     // listed probabilities summing to more than 1
  kTopkChecks = 6
};
enum TopkIdType : int { kIds32 = 0, kIds64 = 1 };

// One teacher, as Python passes it: a row of int64 fields (uhc_fast/topk_inputs.py: teacher_table).
struct TopkTeacher {
  int64_t ids, ids_row_stride, ids_col_stride, ids_dtype;  // (B, k) ids: pointer, strides (elements), TopkIdType
  int64_t k;                                                // slots per row
  int64_t values, values_row_stride, values_col_stride, values_dtype;  // (B, k) values, DType code
  int64_t kind;                                             // TopkKind
  int64_t map, map_size;  // int64 (map_size,): teacher id -> shared id (-1: no shared id, dropped), or 0
};

template <class Out>
struct TopkProblem {
  const TopkTeacher* teachers;
  int N;                  // teachers (at most 63)
  int64_t batch;
  const double* weights;  // (N,)
  double alpha;           // the prior's weight when alpha_given, else the weight for disconnected samples
  bool alpha_given;
  int64_t vocab_size;     // ids must be below it (-1: no bound)
  int method;             // kSD or kCE
  double tol;
  int max_iter;
  double sum_tolerance[4];  // per DType code: how far listed probabilities may sum above 1
  int64_t width;            // output columns
  // outputs
  int64_t* ids;             // (B, width) union ids, sorted by decreasing soft label, -1-padded
  Out* soft;                // (B, width)
  int32_t* union_size;      // (B,)
  bool* disconnected;       // (B,)
  Out* kept;                // (B,) the mass of the kept columns before renormalisation (1 unless truncated)
  int32_t* iterations;      // (B,) ce only
  bool* converged;
  Out* residual;
  Out* step;
  Out* abs_residual;
  unsigned long long* errors;  // (N, kTopkChecks): the first failing row per teacher and check
};

inline int64_t next_pow2(int64_t x) {
  int64_t p = 16;
  while (p < x) p <<= 1;
  return p;
}

// An open-addressing table from 64-bit keys to dense indices 0, 1, ... in order of insertion,
// emptied in O(1) per sample by a generation stamp.
struct KeyTable {
  int64_t* keys;
  int32_t* values;
  uint32_t* stamps;
  int shift;  // 64 - log2(capacity)
  uint64_t mask;
  uint32_t stamp = 0;

  void reset() {
    if (++stamp == 0) {  // wrapped: clear the stamps once
      std::memset(stamps, 0, sizeof(uint32_t) * (mask + 1));
      stamp = 1;
    }
  }
  // The index of `key`; a new key gets `next` (and `inserted` is set).
  int32_t find_or_insert(int64_t key, int32_t next, bool& inserted) {
    uint64_t pos = (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> shift;
    while (true) {
      if (stamps[pos] != stamp) {
        stamps[pos] = stamp, keys[pos] = key, values[pos] = next;
        inserted = true;
        return next;
      }
      if (keys[pos] == key) {
        inserted = false;
        return values[pos];
      }
      pos = (pos + 1) & mask;
    }
  }
};

// One thread's scratch for samples of at most T = sum k_i listed ids and N teachers, carved from
// one buffer (measured with a null base, as the dense scratch is).
struct TopkScratch {
  int64_t T;
  KeyTable ids, groups;
  int64_t* uid;         // (T) union ids, in order of first appearance
  uint64_t* umask;      // (T) teachers listing each union id
  int32_t* ugroup;      // (T) group of each union id
  int32_t* ent_u;       // (T) union index of each accepted slot, teacher by teacher
  double* ent_p;        // (T) its value, then its renormalised probability
  int32_t* tch_off;     // (N + 1) teacher i's accepted slots: ent_* [tch_off[i], tch_off[i + 1])
  int64_t* row_ids;     // (kmax) one row as read
  double* row_values;   // (kmax)
  uint64_t* gmask;      // (T) teachers of each group
  int32_t* gcount;      // (T) classes of each group
  int32_t* rank_of;     // (N) a present teacher's index among the present ones
  double* wts;          // (N + 1) the present teachers' weights, then the prior's
  int32_t *offsets, *class_index, *grp_ptr, *grp_teacher, *grp_cls_ptr, *grp_cls, *col_entry;  // the per-sample Structure
  double* packed;       // (2T) the per-sample problem's packed probabilities
  double* q;            // (T) soft labels over the union
  uint64_t* order;      // (T) sort keys of the union (see step 4)
  char* ce;             // CeScratch of the largest sample
  int64_t bytes = 0;

  template <class T_>
  T_* take(char* base, int64_t n) {
    const int64_t start = (bytes + 63) & ~int64_t(63);
    bytes = start + n * int64_t(sizeof(T_));
    return base ? reinterpret_cast<T_*>(base + start) : nullptr;
  }

  // Carve from `base` (null: measure only; `bytes` is then the size to allocate).
  TopkScratch(char* base, int64_t T_, int N, int64_t kmax) : T(T_) {
    const int64_t cap = next_pow2(2 * T);
    int bits = 0;
    while ((int64_t(1) << bits) < cap) ++bits;
    for (KeyTable* t : {&ids, &groups}) {
      t->keys = take<int64_t>(base, cap);
      t->values = take<int32_t>(base, cap);
      t->stamps = take<uint32_t>(base, cap);
      t->shift = 64 - bits;
      t->mask = static_cast<uint64_t>(cap - 1);
      if (base) std::memset(t->stamps, 0, sizeof(uint32_t) * cap);
    }
    uid = take<int64_t>(base, T);
    umask = take<uint64_t>(base, T);
    ugroup = take<int32_t>(base, T);
    ent_u = take<int32_t>(base, T);
    ent_p = take<double>(base, T);
    tch_off = take<int32_t>(base, N + 1);
    row_ids = take<int64_t>(base, kmax);
    row_values = take<double>(base, kmax);
    gmask = take<uint64_t>(base, T);
    gcount = take<int32_t>(base, T);
    rank_of = take<int32_t>(base, N);
    wts = take<double>(base, N + 1);
    offsets = take<int32_t>(base, N + 2);
    class_index = take<int32_t>(base, 2 * T);
    grp_ptr = take<int32_t>(base, T + 1);
    grp_teacher = take<int32_t>(base, 2 * T);
    grp_cls_ptr = take<int32_t>(base, T + 1);
    grp_cls = take<int32_t>(base, T);
    col_entry = take<int32_t>(base, 2 * T);
    packed = take<double>(base, 2 * T);
    q = take<double>(base, T);
    order = take<uint64_t>(base, T);
    // the largest per-sample structure: N + 1 teachers, T classes and groups, 2T columns and entries
    DenseArena measure;
    { CeScratch<1, DenseArena> measured(measure, Structure::of_sizes(N + 1, int32_t(T), int32_t(2 * T), int32_t(T), int32_t(2 * T), 0)); }
    ce = take<char>(base, measure.bytes());
  }
};

// Bits set in a teacher mask (a few: a loop beats the library call of a build without POPCNT).
inline int popcount64(uint64_t x) {
  int n = 0;
  for (; x; x &= x - 1) ++n;
  return n;
}

template <class IdT>
inline int64_t read_id(const TopkTeacher& t, int64_t b, int64_t j) {
  return static_cast<int64_t>(reinterpret_cast<const IdT*>(t.ids)[b * t.ids_row_stride + j * t.ids_col_stride]);
}

// Teacher t's row b into row_ids / row_values (values as doubles).
template <class IdT>
inline void read_row_ids(const TopkTeacher& t, int64_t b, int64_t* out) {
  for (int64_t j = 0; j < t.k; ++j) out[j] = read_id<IdT>(t, b, j);
}

inline void read_topk_row(const TopkTeacher& t, int64_t b, int64_t* ids, double* values) {
  if (t.ids_dtype == kIds32)
    read_row_ids<int32_t>(t, b, ids);
  else
    read_row_ids<int64_t>(t, b, ids);
  const uintptr_t data = static_cast<uintptr_t>(t.values);
  const int64_t at = b * t.values_row_stride, step = t.values_col_stride;
  switch (t.values_dtype) {  // once per row: the loop itself reads one stored type
    case kFloat16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(data) + at;
      for (int64_t j = 0; j < t.k; ++j) values[j] = half_to_float(p[j * step]);
      break;
    }
    case kBFloat16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(data) + at;
      for (int64_t j = 0; j < t.k; ++j) values[j] = bfloat16_to_float(p[j * step]);
      break;
    }
    case kFloat32: {
      const float* p = reinterpret_cast<const float*>(data) + at;
      for (int64_t j = 0; j < t.k; ++j) values[j] = p[j * step];
      break;
    }
    default: {
      const double* p = reinterpret_cast<const double*>(data) + at;
      for (int64_t j = 0; j < t.k; ++j) values[j] = p[j * step];
    }
  }
}

// Solve sample b (see the top of this file) and write its outputs.
template <class Out>
inline void solve_topk_sample(const TopkProblem<Out>& prob, int64_t b, TopkScratch& sc) {
  const int N = prob.N;
  Out* soft_row = prob.soft + b * prob.width;
  int64_t* ids_row = prob.ids + b * prob.width;
  auto write_empty = [&](int32_t size) {  // a sample with no ids (or a bad row)
    for (int64_t c = 0; c < prob.width; ++c) ids_row[c] = -1, soft_row[c] = Out(0);
    prob.union_size[b] = size;
    prob.disconnected[b] = false;
    prob.kept[b] = Out(0);
    if (prob.method == kCE) {
      prob.iterations[b] = 0, prob.converged[b] = size == 0;
      prob.residual[b] = Out(0), prob.step[b] = Out(0), prob.abs_residual[b] = Out(0);
    }
  };

  // 1. read, validate and merge
  sc.ids.reset();
  int32_t U = 0, taken = 0;
  uint64_t present = 0;
  bool bad = false;
  for (int i = 0; i < N; ++i) {
    const TopkTeacher& t = prob.teachers[i];
    const uint64_t bit = uint64_t(1) << i;
    sc.tch_off[i] = taken;
    read_topk_row(t, b, sc.row_ids, sc.row_values);
    const int64_t* map = reinterpret_cast<const int64_t*>(t.map);
    const bool probs = t.kind == kTopkProbs;
    int failed = kTopkChecks;  // the first check (in TopkCheck order) this row fails
    double sum = 0, top = -INFINITY;
    bool nan = false, out_of_range = false;
    const int32_t first = taken;
    for (int64_t j = 0; j < t.k; ++j) {
      int64_t id = sc.row_ids[j];
      if (id == -1) continue;
      if (id < -1 || (map && id >= t.map_size)) {
        failed = kBadId;
        continue;
      }
      if (map) {
        id = map[id];
        if (id == -1) continue;  // no shared id: the teacher's distribution conditioned on the rest
      }
      if (prob.vocab_size >= 0 && id >= prob.vocab_size) {
        failed = kBadId;
        continue;
      }
      const double v = sc.row_values[j];
      if (probs) {
        nan |= !(v - v == 0);  // NaN, +-Inf
        out_of_range |= v < 0;
        sum += v;
      } else {
        nan |= v != v || v == INFINITY;
        out_of_range |= t.kind == kTopkLogprobs && v > prob.sum_tolerance[t.values_dtype];
        top = v > top ? v : top;
      }
      bool inserted;
      const int32_t u = sc.ids.find_or_insert(id, U, inserted);
      if (inserted) sc.uid[U] = id, sc.umask[U] = 0, ++U;
      if (sc.umask[u] & bit) {
        failed = std::min<int>(failed, kDuplicate);
        continue;
      }
      sc.umask[u] |= bit;
      sc.ent_u[taken] = u, sc.ent_p[taken] = v, ++taken;
    }
    if (failed == kTopkChecks && taken > first) {
      if (nan) {
        failed = kNaN;
      } else if (out_of_range) {
        failed = kOutOfRange;
      } else if (probs) {
        if (sum == 0)
          failed = kNoMass;
        else if (sum - 1 > prob.sum_tolerance[t.values_dtype])
          failed = kSumOver;
      } else if (top == -INFINITY) {
        failed = kNoMass;
      } else {
        sum = 0;
        for (int32_t e = first; e < taken; ++e) sum += vexp(sc.ent_p[e] - top);
        if (t.kind == kTopkLogprobs && vexp(top) * sum - 1 > prob.sum_tolerance[t.values_dtype]) failed = kSumOver;
      }
    }
    if (failed < kTopkChecks) {
      record(prob.errors + i * kTopkChecks + failed, static_cast<unsigned long long>(b));
      bad = true;
      continue;
    }
    if (taken == first) continue;  // nothing listed: the teacher is absent from this sample
    present |= bit;
    const double inv = 1.0 / sum;
    for (int32_t e = first; e < taken; ++e) sc.ent_p[e] = probs ? sc.ent_p[e] * inv : vexp(sc.ent_p[e] - top) * inv;
  }
  sc.tch_off[N] = taken;
  if (bad) return write_empty(0);
  if (U == 0) return write_empty(0);

  // 2. groups of ids listed by the same teachers; connectivity; the prior
  sc.groups.reset();
  int32_t G = 0;
  for (int32_t u = 0; u < U; ++u) {
    bool inserted;
    const int32_t g = sc.groups.find_or_insert(static_cast<int64_t>(sc.umask[u]), G, inserted);
    if (inserted) sc.gmask[G] = sc.umask[u], sc.gcount[G] = 0, ++G;
    sc.ugroup[u] = g, ++sc.gcount[g];
  }
  uint64_t reached = present & (~present + 1);  // the first present teacher, then all it links to
  for (bool grew = true; grew;) {
    grew = false;
    for (int32_t g = 0; g < G; ++g)
      if ((sc.gmask[g] & reached) && (sc.gmask[g] & ~reached)) reached |= sc.gmask[g], grew = true;
  }
  const bool disconnected = reached != present;
  const double alpha = prob.alpha_given ? prob.alpha : disconnected ? prob.alpha : 0.0;
  const bool prior = alpha > 0;
  prob.union_size[b] = U;
  prob.disconnected[b] = disconnected;

  int np = 0;
  for (int i = 0; i < N; ++i)
    if (present >> i & 1) sc.rank_of[i] = np, sc.wts[np] = prob.weights[i], ++np;

  if (prob.method == kSD) {
    const double fill = prior ? alpha / U : 0.0;
    for (int32_t u = 0; u < U; ++u) sc.q[u] = fill;
    for (int i = 0; i < N; ++i)
      for (int32_t e = sc.tch_off[i]; e < sc.tch_off[i + 1]; ++e) sc.q[sc.ent_u[e]] += prob.weights[i] * sc.ent_p[e];
    double total = 0;
    for (int32_t u = 0; u < U; ++u) total += sc.q[u];
    const double inv = 1.0 / total;
    for (int32_t u = 0; u < U; ++u) sc.q[u] *= inv;
  } else {
    // 3. the per-sample structure: present teachers in index order, then the prior
    const int nt = np + (prior ? 1 : 0);
    sc.wts[np] = alpha;
    sc.offsets[0] = 0;
    for (int i = 0, r = 0; i < N; ++i)
      if (present >> i & 1) sc.offsets[r + 1] = sc.offsets[r] + (sc.tch_off[i + 1] - sc.tch_off[i]), ++r;
    if (prior) sc.offsets[nt] = sc.offsets[np] + U;
    const int32_t nnz = sc.offsets[nt];
    sc.grp_ptr[0] = 0, sc.grp_cls_ptr[0] = 0;
    for (int32_t g = 0; g < G; ++g) {
      sc.grp_ptr[g + 1] = sc.grp_ptr[g] + popcount64(sc.gmask[g]) + (prior ? 1 : 0);
      sc.grp_cls_ptr[g + 1] = sc.grp_cls_ptr[g] + sc.gcount[g];
      int32_t at = sc.grp_ptr[g];
      for (uint64_t m = sc.gmask[g]; m; m &= m - 1) sc.grp_teacher[at++] = sc.rank_of[__builtin_ctzll(m)];
      if (prior) sc.grp_teacher[at] = np;
      sc.gcount[g] = sc.grp_cls_ptr[g];  // now: the next free place of the group's classes
    }
    for (int32_t u = 0; u < U; ++u) sc.grp_cls[sc.gcount[sc.ugroup[u]]++] = u;
    const int32_t E = sc.grp_ptr[G];
    Structure s = Structure::of_sizes(nt, U, nnz, G, E, 0);
    // (the sections CeSolver reads; the optional by-teacher and by-pair ones stay null)
    s.offsets = sc.offsets, s.class_index = sc.class_index, s.class_group = sc.ugroup;
    s.grp_ptr = sc.grp_ptr, s.grp_teacher = sc.grp_teacher, s.grp_cls_ptr = sc.grp_cls_ptr, s.grp_cls = sc.grp_cls;
    s.col_entry = sc.col_entry;
    Problem<double> dense{};
    dense.s = s;
    dense.batch = 1;
    dense.weights = sc.wts;
    dense.method = kCE;
    dense.tol = prob.tol;
    dense.max_iter = prob.max_iter;
    const Tile<1, double> tile{dense, 0, 1};
    DenseArena arena(sc.ce);
    CeScratch<1, DenseArena> ce(arena, s);
    double* packed = sc.packed;
    // each column's (group, teacher) entry: a group's teachers are in rank order, the prior last
    for (int i = 0, r = 0; i < N; ++i) {
      if (!(present >> i & 1)) continue;
      const uint64_t below = (uint64_t(1) << i) - 1;
      for (int32_t e = sc.tch_off[i], col = sc.offsets[r]; e < sc.tch_off[i + 1]; ++e, ++col) {
        const int32_t u = sc.ent_u[e], g = sc.ugroup[u];
        sc.class_index[col] = u, packed[col] = sc.ent_p[e];
        sc.col_entry[col] = sc.grp_ptr[g] + popcount64(sc.gmask[g] & below);
      }
      ++r;
    }
    if (prior) {
      const double uniform = 1.0 / U;
      for (int32_t u = 0, col = sc.offsets[np]; u < U; ++u, ++col)
        sc.class_index[col] = u, packed[col] = uniform, sc.col_entry[col] = sc.grp_ptr[sc.ugroup[u] + 1] - 1;
    }
    const CeSolver<1, double, DenseArena> solver{tile, ce};
    solver.packed_evidence(packed);
    const Report<1> report = solver.solve(true, prob.tol, prob.max_iter);
    for (int32_t u = 0; u < U; ++u) sc.q[u] = ce.n[u];
    prob.iterations[b] = static_cast<int32_t>(report.iterations);
    prob.converged[b] = report.converged;
    prob.residual[b] = static_cast<Out>(report.residual);
    prob.step[b] = static_cast<Out>(report.step);
    prob.abs_residual[b] = static_cast<Out>(report.abs_residual);
  }

  // 4. ids by decreasing soft label (ties: increasing id), the first `width` of them: sorted as
  // integer keys (the float32 rounding of q, descending, then the union index), then each run of
  // keys with equal float32 q re-sorted by (q, id)
  uint64_t* keys = sc.order;
  const double* q = sc.q;
  const int64_t* uid = sc.uid;
  for (int32_t u = 0; u < U; ++u) {
    const float f = static_cast<float>(q[u]);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    keys[u] = (static_cast<uint64_t>(~bits) << 32) | static_cast<uint32_t>(u);
  }
  std::sort(keys, keys + U);
  for (int32_t i = 0; i < U;) {
    int32_t j = i + 1;
    while (j < U && (keys[j] >> 32) == (keys[i] >> 32)) ++j;
    if (j - i > 1)
      std::sort(keys + i, keys + j, [q, uid](uint64_t a, uint64_t c) {
        const uint32_t x = static_cast<uint32_t>(a), y = static_cast<uint32_t>(c);
        return q[x] > q[y] || (q[x] == q[y] && uid[x] < uid[y]);
      });
    i = j;
  }
  const int64_t kept = std::min<int64_t>(U, prob.width);
  double mass = 1.0;
  if (kept < U) {
    mass = 0;
    for (int64_t c = 0; c < kept; ++c) mass += q[static_cast<uint32_t>(keys[c])];
  }
  const double scale = kept < U ? 1.0 / mass : 1.0;
  for (int64_t c = 0; c < kept; ++c) {
    const uint32_t u = static_cast<uint32_t>(keys[c]);
    ids_row[c] = uid[u], soft_row[c] = static_cast<Out>(q[u] * scale);
  }
  for (int64_t c = kept; c < prob.width; ++c) ids_row[c] = -1, soft_row[c] = Out(0);
  prob.kept[b] = static_cast<Out>(mass);
}

}  // namespace UHC_NAMESPACE
