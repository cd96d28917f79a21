// Solver settings every backend shares: the C++ copy of uhc_fast/constants.py and of the method
// codes of uhc_fast/methods.py (tests/test_constants.py checks that the two languages agree).
#pragma once

namespace UHC_NAMESPACE {

enum Method : int { kSD = 0, kCE = 1, kMFP = 2, kMFLF = 3, kMFLU = 4 };

constexpr int kDefaultMaxIter = 100;  // the cap of the ce solve mf-p starts from
constexpr double kArmijo = 1e-4;      // sufficient decrease of every backtracking line search
constexpr int kMaxHalvings = 40;      // how often a line search may halve its step
constexpr double kMaxLogStep = 2.0;   // the largest Newton step in a log-scale variable
constexpr double kConvergedLogStep = 0.25;  // ce's longest Newton step (log-scale) at convergence
constexpr double kChangeRounding = 8 * 0x1p-53;  // ce's line search: the rounding it allows F's change
constexpr double kMinScale = 1e-3;    // the smallest mf-lu teacher scale

}  // namespace UHC_NAMESPACE
