// `mf-lf`: least squares in logit space with one shift per teacher, in closed form
// (uhc_fast/reference/mf_lf.py): u_l = zbar_l - sum_{i covers l} w_i c_i / W_l with c = S b,
// S the eliminated system Python computes once per mask and weights (the heaviest teacher grounded).
// Every pass runs teacher by teacher, like `sd`'s: a teacher's logits are added to the classes
// while its row is in cache, and are never stored for the whole sample.
#pragma once

#include "tile.h"

namespace UHC_NAMESPACE {

template <int W, class Arena>
struct MfLfScratch {
  using D = typename Lanes<W>::D;
  View<Arena, D> z, u, b, c;  // one teacher's logits (at most K), u (K), b and c (N)
  View<Arena, double> inv_weight;  // 1 / W_l (K): the lanes share the weights
  UHC_HD MfLfScratch(Arena& a, const Structure& s)
      : z(a.template take<D>(s.K)),
        u(a.template take<D>(s.K)),
        b(a.template take<D>(s.N)),
        c(a.template take<D>(s.N)),
        inv_weight(a.template take<double>(s.K)) {}
};

template <int W, class Out, class Scratch>
UHC_HD void solve_mf_lf(const Tile<W, Out>& tile, const Scratch& sc) {
  using D = typename Lanes<W>::D;
  const Structure& s = tile.s();
  const double* w = tile.prob.weights;
  const double* system = tile.prob.system;
  for (int l = 0; l < s.K; ++l) sc.u[l] = splat<D>(0.0), sc.inv_weight[l] = 0.0;
  // u_l = zbar_l, the weighted mean of the teachers' logits of class l; b_i = sum_{l in L_i} z_il
  // for now (the means are subtracted below, once they are all known)
  for (int i = 0; i < s.N; ++i) {
    tile.load_teacher(i, sc.z);
    const double wi = w[i];
    const int lo = s.offsets[i];
    D total = splat<D>(0.0);
    for (int j = lo; j < s.offsets[i + 1]; ++j) {
      const int l = s.class_index[j];
      const D z = sc.z[j - lo];
      total += z;
      sc.u[l] = D(sc.u[l]) + wi * z;
      sc.inv_weight[l] = sc.inv_weight[l] + wi;
    }
    sc.b[i] = total;
  }
  for (int l = 0; l < s.K; ++l) {
    const double weight = sc.inv_weight[l];
    sc.inv_weight[l] = 1.0 / (weight > 0 ? weight : 1.0);
    sc.u[l] = D(sc.u[l]) * sc.inv_weight[l];
  }
  for (int i = 0; i < s.N; ++i) {  // b_i = sum_{l in L_i} (z_il - zbar_l)
    D mean = splat<D>(0.0);
    for (int j = s.offsets[i]; j < s.offsets[i + 1]; ++j) mean += D(sc.u[s.class_index[j]]);
    sc.b[i] = D(sc.b[i]) - mean;
  }
  for (int i = 0; i < s.N; ++i) {
    D acc = splat<D>(0.0);
    for (int k = 0; k < s.N; ++k) acc += system[i * s.N + k] * D(sc.b[k]);
    sc.c[i] = acc;
  }
  for (int i = 0; i < s.N; ++i) {  // u_l -= w_i c_i / W_l for every teacher i covering l
    const D shift = w[i] * D(sc.c[i]);
    for (int j = s.offsets[i]; j < s.offsets[i + 1]; ++j) {
      const int l = s.class_index[j];
      sc.u[l] = D(sc.u[l]) - shift * sc.inv_weight[l];
    }
  }
  tile.write_masked_softmax(sc.u);
}

}  // namespace UHC_NAMESPACE
