// Solving one tile of samples, whatever the method: carve its scratch, read its rows, solve, write
// out. The launchers (cpu/tiles.cpp: OpenMP over tiles of W lanes; cuda/kernels.cu and grid.h: one
// thread per single-lane tile) only decide which tiles a thread takes.
#pragma once

#include <type_traits>

#include "ce.h"
#include "mf_lf.h"
#include "mf_lu.h"
#include "mf_p.h"
#include "sd.h"

namespace UHC_NAMESPACE {

// One tile of method M.
template <int M, int W, class Out, class Arena>
UHC_HD void solve_tile_as(const Problem<Out>& prob, int64_t first, int lanes, Arena& arena) {
  const Tile<W, Out> tile{prob, first, lanes};
  const Structure& s = prob.s;
  if constexpr (M == kSD) {
    SdScratch<W, Arena> sc(arena, s);
    solve_sd(tile, sc);
  } else if constexpr (M == kCE) {
    CeScratch<W, Arena> sc(arena, s);
    const CeSolver<W, Out, Arena> solver{tile, sc};
    const auto valid = solver.read_evidence();
    const Report<W> report = solver.solve(valid, prob.tol, prob.max_iter);
    tile.write_soft(sc.n);
    tile.write_report(report);
  } else if constexpr (M == kMFP) {
    MfPScratch<W, Arena> sc(arena, s);
    const auto valid = tile.load(sc.p);
    const Report<W> report = MfPSolver<W, Out, Arena>{tile, sc}.solve(valid, prob.tol, prob.max_iter);
    tile.write_soft(sc.q);
    tile.write_report(report);
  } else if constexpr (M == kMFLF) {
    MfLfScratch<W, Arena> sc(arena, s);
    solve_mf_lf(tile, sc);
  } else {
    MfLuScratch<W, Arena> sc(arena, s);
    const auto valid = tile.load(sc.z);
    const Report<W> report = MfLuSolver<W, Out, Arena>{tile, sc}.solve(valid, prob.tol, prob.max_iter);
    tile.write_masked_softmax(sc.u);
    tile.write_report(report);
  }
}

// Calls f(std::integral_constant<int, method>): the method as a compile-time constant (host side).
template <class F>
inline void with_method(int method, F f) {
  switch (method) {
    case kSD:
      return f(std::integral_constant<int, kSD>{});
    case kCE:
      return f(std::integral_constant<int, kCE>{});
    case kMFP:
      return f(std::integral_constant<int, kMFP>{});
    case kMFLF:
      return f(std::integral_constant<int, kMFLF>{});
    default:
      return f(std::integral_constant<int, kMFLU>{});
  }
}

// One tile of a launch, whatever the method: carve its scratch, read its rows, solve, write out.
// The launchers (cpu/tiles.cpp: OpenMP over tiles of W lanes; cuda/kernels.cu and grid.h: one
// thread per single-lane tile) only decide which tiles a thread takes.
template <int W, class Out, class Arena>
inline void solve_tile(const Problem<Out>& prob, int64_t first, int lanes, Arena& arena) {
  with_method(prob.method, [&](auto m) { solve_tile_as<decltype(m)::value, W>(prob, first, lanes, arena); });
}

// The scratch one tile of `method` needs, measured by carving it from a null arena.
template <int W>
inline int64_t tile_bytes(int method, const Structure& s) {
  DenseArena arena;
  switch (method) {
    case kSD:
      { SdScratch<W, DenseArena> measured(arena, s); }
      break;
    case kCE:
      { CeScratch<W, DenseArena> measured(arena, s); }
      break;
    case kMFP:
      { MfPScratch<W, DenseArena> measured(arena, s); }
      break;
    case kMFLF:
      { MfLfScratch<W, DenseArena> measured(arena, s); }
      break;
    default:
      { MfLuScratch<W, DenseArena> measured(arena, s); }
      break;
  }
  return arena.bytes();
}

// The same for the GPU's interleaved workspace: double slots per thread.
UHC_HD int64_t tile_slots(int method, const Structure& s) {
  StridedArena arena(nullptr, 1);
  switch (method) {
    case kSD:
      { SdScratch<1, StridedArena> measured(arena, s); }
      break;
    case kCE:
      { CeScratch<1, StridedArena> measured(arena, s); }
      break;
    case kMFP:
      { MfPScratch<1, StridedArena> measured(arena, s); }
      break;
    case kMFLF:
      { MfLfScratch<1, StridedArena> measured(arena, s); }
      break;
    default:
      { MfLuScratch<1, StridedArena> measured(arena, s); }
      break;
  }
  return arena.elements();
}

}  // namespace UHC_NAMESPACE
