// The mask structure: everything that depends only on the class sets, identical for every sample.
// Python builds it once per TeacherSet (uhc_fast/problem.py: Layout.structure) as one int32 buffer:
// a header (N, K, nnz, G, E) and the sections below, in this order.
#pragma once

#include <cstdint>

#include "simd.h"

namespace UHC_NAMESPACE {

// The section names in buffer order (tests compare them with uhc_fast.problem.STRUCTURE_SECTIONS).
constexpr const char* kStructureSections[] = {"offsets", "class_index", "cls_ptr",   "cls_col",
                                              "cls_teacher", "grp_cls_ptr", "grp_cls", "grp_ptr",
                                              "grp_teacher", "col_entry",  "class_group", "scale_anchor",
                                              "tch_ptr",     "tch_group",  "tch_shared",  "pair_ptr",
                                              "pair_group"};
constexpr int kStructureHeader = 6;  // N, K, nnz, G, E, P
constexpr int kPriorTeacher = 2;     // the scale_anchor mark of the alpha prior teacher

struct Structure {
  int32_t N;                   // teachers (including the alpha prior, if any)
  int32_t K;                   // classes in the union
  int32_t nnz;                 // packed columns per sample
  int32_t G;                   // groups: classes covered by the same set of teachers
  int32_t E;                   // (group, teacher) entries: sum over groups of their teacher counts
  int32_t P;                   // (teacher pair, group) entries: sum over groups of d_g (d_g - 1) / 2
  const int32_t* offsets;      // (N+1): teacher i owns packed columns offsets[i] .. offsets[i+1]
  const int32_t* class_index;  // (nnz): class of each packed column
  const int32_t* cls_ptr;      // (K+1): class l owns entries cls_ptr[l] .. cls_ptr[l+1]
  const int32_t* cls_col;      // (nnz): packed column of each entry, entries grouped by class
  const int32_t* cls_teacher;  // (nnz): teacher of each entry (ascending within a class)
  const int32_t* grp_cls_ptr;  // (G+1): group g's classes are grp_cls[grp_cls_ptr[g] .. grp_cls_ptr[g+1]]
  const int32_t* grp_cls;      // (K): classes grouped by group
  const int32_t* grp_ptr;      // (G+1): group g's teachers are grp_teacher[grp_ptr[g] .. grp_ptr[g+1]]
  const int32_t* grp_teacher;  // (E): teachers of each group, ascending
  const int32_t* col_entry;    // (nnz): the (group, teacher) entry of each packed column
  const int32_t* class_group;  // (K): group of each class
  const int32_t* scale_anchor;  // (N): 1 for the teachers whose mf-lu scale is held, 2 for the prior teacher
  // optional (null in a structure built per sample): groups by teacher, and groups by teacher pair
  const int32_t* tch_ptr;      // (N+1): teacher i's groups are tch_group[tch_ptr[i] .. tch_ptr[i+1]]
  const int32_t* tch_group;    // (E): each teacher's groups, those it shares with other teachers first
  const int32_t* tch_shared;   // (N): how many of teacher i's groups it shares with other teachers
  const int32_t* pair_ptr;     // (N(N-1)/2 + 1): groups pair_group[pair_ptr[p] .. pair_ptr[p+1]] hold teachers i < j
  const int32_t* pair_group;   // (P): groups by teacher pair (pairs row-major)

  // The sizes alone (what scratch sizes depend on), with no arrays.
  UHC_HD static Structure of_sizes(int32_t N, int32_t K, int32_t nnz, int32_t G, int32_t E, int32_t P) {
    Structure s{};
    s.N = N, s.K = K, s.nnz = nnz, s.G = G, s.E = E, s.P = P;
    return s;
  }

  // The view of a buffer with these sizes (the header is not read: on a GPU the buffer is device memory).
  UHC_HD static Structure from_buffer(const int32_t* buffer, int32_t N, int32_t K, int32_t nnz, int32_t G,
                                      int32_t E, int32_t P) {
    Structure s = of_sizes(N, K, nnz, G, E, P);
    const int32_t* p = buffer + kStructureHeader;
    auto take = [&p](int64_t n) {
      const int32_t* section = p;
      p += n;
      return section;
    };
    s.offsets = take(N + 1);
    s.class_index = take(nnz);
    s.cls_ptr = take(K + 1);
    s.cls_col = take(nnz);
    s.cls_teacher = take(nnz);
    s.grp_cls_ptr = take(G + 1);
    s.grp_cls = take(K);
    s.grp_ptr = take(G + 1);
    s.grp_teacher = take(E);
    s.col_entry = take(nnz);
    s.class_group = take(K);
    s.scale_anchor = take(N);
    s.tch_ptr = take(N + 1);
    s.tch_group = take(E);
    s.tch_shared = take(N);
    s.pair_ptr = take(int64_t(N) * (N - 1) / 2 + 1);
    s.pair_group = take(P);
    return s;
  }
};

}  // namespace UHC_NAMESPACE
