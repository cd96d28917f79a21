// The CPU launcher for one instruction set: OpenMP over tiles of UHC_LANES samples, each thread
// with one scratch buffer for the whole call. CMakeLists.txt compiles this file once per set
// (baseline x86-64, AVX2, AVX-512), each in its own namespace, and cpu/module.cpp picks one at
// run time.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bindings.h"

namespace UHC_NAMESPACE {
namespace {

constexpr int W = UHC_LANES;

template <class Out>
void run(const Problem<Out>& prob, int threads) {
  const int64_t bytes = tile_bytes<W>(prob.method, prob.s);
  const int64_t tiles = (prob.batch + W - 1) / W;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    std::unique_ptr<char[]> buffer(new char[bytes + 64]);
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(buffer.get()) + 63) & ~uintptr_t(63));
    // the scratch starts as NaN (all bits set): a solver reading a slot it never wrote shows in its
    // answers, every time, rather than by the allocator's chance
    std::memset(base, 0xff, static_cast<size_t>(bytes));
    // iteration counts differ between tiles: hand them out one at a time
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < tiles; ++t) {
      DenseArena arena(base);
      const int64_t first = t * W;
      solve_tile<W, Out>(prob, first, static_cast<int>(std::min<int64_t>(W, prob.batch - first)), arena);
    }
  }
  (void)threads;
}

}  // namespace

// The entry point cpu/module.cpp calls (args: an Args, the same struct in every namespace).
void solve_tiles(const void* args, int threads) {
  dispatch_dtype(*static_cast<const Args*>(args), [threads](const auto& prob) { run(prob, threads); });
}

int lanes() { return W; }

}  // namespace UHC_NAMESPACE
