// `sd`: the naive extension of standard distillation (zero-pad, weighted average).
#pragma once

#include "tile.h"

namespace UHC_NAMESPACE {

template <int W, class Arena>
struct SdScratch {
  using D = typename Lanes<W>::D;
  View<Arena, D> p, n;  // one teacher's probabilities (at most K), class sums (K)
  UHC_HD SdScratch(Arena& a, const Structure& s) : p(a.template take<D>(s.K)), n(a.template take<D>(s.K)) {}
};

// q_l proportional to sum_{i covers l} w_i p_il, written out.
template <int W, class Out, class Scratch>
UHC_HD void solve_sd(const Tile<W, Out>& tile, const Scratch& sc) {
  using D = typename Lanes<W>::D;
  const Structure& s = tile.s();
  for (int l = 0; l < s.K; ++l) sc.n[l] = splat<D>(0.0);
  for (int i = 0; i < s.N; ++i) {  // one teacher at a time: its rows stay in cache for the scatter
    D scale = splat<D>(1.0);
    tile.load_teacher(i, sc.p, &scale);
    const D wi = splat<D>(tile.prob.weights[i]) * scale;
    const int lo = s.offsets[i];
    for (int j = lo; j < s.offsets[i + 1]; ++j) sc.n[s.class_index[j]] = D(sc.n[s.class_index[j]]) + wi * D(sc.p[j - lo]);
  }
  D sum = splat<D>(0.0);
  for (int l = 0; l < s.K; ++l) sum += D(sc.n[l]);
  const D inv = splat<D>(1.0) / sum;
  for (int l = 0; l < s.K; ++l) sc.n[l] = D(sc.n[l]) * inv;
  tile.write_soft(sc.n);
}

}  // namespace UHC_NAMESPACE
