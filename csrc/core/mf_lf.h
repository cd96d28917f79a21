// `mf-lf`: least squares in logit space with one shift per teacher, in closed form
// (uhc_fast/reference/mf_lf.py): u_l = zbar_l - sum_{i covers l} w_i c_i / W_l with c = S b,
// S the eliminated system Python computes once per mask and weights (the last teacher grounded).
#pragma once

#include "tile.h"

namespace UHC_NAMESPACE {

template <int W, class Arena>
struct MfLfScratch {
  using D = typename Lanes<W>::D;
  View<Arena, D> z, u, b, c;  // packed logits (nnz), u (K), b and c (N)
  UHC_HD MfLfScratch(Arena& a, const Structure& s)
      : z(a.template take<D>(s.nnz)),
        u(a.template take<D>(s.K)),
        b(a.template take<D>(s.N)),
        c(a.template take<D>(s.N)) {}
};

// u of the fixed-scale fit from the logits in sc.z (already loaded), into sc.u.
template <int W, class Out, class Scratch>
UHC_HD void mf_lf_fit(const Tile<W, Out>& tile, const Scratch& sc) {
  using D = typename Lanes<W>::D;
  const Structure& s = tile.s();
  const double* w = tile.prob.weights;
  const double* system = tile.prob.system;
  for (int l = 0; l < s.K; ++l) {  // zbar_l: the weighted mean of the teachers' logits of class l
    D wz = splat<D>(0.0);
    double total = 0;
    for (int k = s.cls_ptr[l]; k < s.cls_ptr[l + 1]; ++k) {
      const double wi = w[s.cls_teacher[k]];
      wz += wi * D(sc.z[s.cls_col[k]]);
      total += wi;
    }
    sc.u[l] = wz / splat<D>(total > 0 ? total : 1.0);
  }
  for (int i = 0; i < s.N; ++i) {
    D acc = splat<D>(0.0);
    for (int j = s.offsets[i]; j < s.offsets[i + 1]; ++j) acc += D(sc.z[j]) - D(sc.u[s.class_index[j]]);
    sc.b[i] = acc;
  }
  for (int i = 0; i < s.N; ++i) {
    D acc = splat<D>(0.0);
    for (int k = 0; k < s.N; ++k) acc += system[i * s.N + k] * D(sc.b[k]);
    sc.c[i] = acc;
  }
  for (int l = 0; l < s.K; ++l) {
    D wc = splat<D>(0.0);
    double total = 0;
    for (int k = s.cls_ptr[l]; k < s.cls_ptr[l + 1]; ++k) {
      const double wi = w[s.cls_teacher[k]];
      wc += wi * D(sc.c[s.cls_teacher[k]]);
      total += wi;
    }
    sc.u[l] = D(sc.u[l]) - wc / splat<D>(total > 0 ? total : 1.0);
  }
}

template <int W, class Out, class Scratch>
UHC_HD void solve_mf_lf(const Tile<W, Out>& tile, const Scratch& sc) {
  tile.load(sc.z);
  mf_lf_fit(tile, sc);
  tile.write_masked_softmax(sc.u);
}

}  // namespace UHC_NAMESPACE
