"""The compiled CPU backend against the torch reference, every method side by side.

The issue-3 workload: K=1000 classes, N=20 teachers each covering ~25% of the classes, B=8192
float32 samples (noisy teacher outputs, so the iterative methods have work to do), solved to a
residual of 1e-5. Both backends run in the same process, their repetitions interleaved (reference,
compiled, reference, ...) so that a burst of load on a shared machine hits both. Prints a table with
the best and the median time of each, the speed-up of best over best (the usual estimate of
noise-free time, as in ``timeit``) and of median over median, the largest soft-label difference and
the iterations, and optionally writes it as CSV.

    python benchmarks/bench_native.py                      # the issue's workload
    python benchmarks/bench_native.py --batch 1024 --methods ce sd --csv out.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import describe, machine_line
from benchmarks.workloads import class_sets
from uhc_fast import TeacherSet, dispatch
from uhc_fast.api import METHODS
from uhc_fast.inputs import pack


def workload(batch: int, num_classes: int, num_teachers: int, fraction: float, noise: float, seed: int = 0):
    """Teachers covering ``fraction`` of the classes each; outputs ``softmax(2g + noise g')`` on their classes."""
    coverage = fraction * num_teachers  # class_sets' coverage is teachers per class
    teachers = TeacherSet(class_sets(num_classes, num_teachers, coverage=coverage, seed=seed), num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed + 1)
    logits = 2.0 * torch.randn(batch, num_classes, generator=gen, dtype=torch.float64)
    outputs = []
    for cs in teachers.class_sets:
        z = logits[:, list(cs)] + noise * torch.randn(batch, len(cs), generator=gen, dtype=torch.float64)
        outputs.append(torch.softmax(z, dim=1).to(torch.float32))
    return teachers, outputs


def timed_pair(reference, compiled, repeats: int):
    """Interleaved timings of two callables: ``(times_ref, times_cpu, result_ref, result_cpu)``."""
    results = [reference(), compiled()]  # warm-up (allocator, OpenMP pool, caches)
    times = ([], [])
    for _ in range(repeats):
        for k, fn in enumerate((reference, compiled)):
            start = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - start)
    return times[0], times[1], results[0], results[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--teachers", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.25, help="fraction of the classes each teacher covers")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)

    cpu = dispatch.select("cpu", torch.device("cpu"))
    ref = dispatch.select("torch", torch.device("cpu"))
    teachers, outputs = workload(args.batch, args.classes, args.teachers, args.fraction, args.noise)
    info = describe()
    machine = f"{machine_line(info)}; torch {info['torch']}; commit {info['commit']}"
    print(f"# {machine}")
    print(f"# K={args.classes} N={args.teachers} nnz={sum(teachers.sizes)} B={args.batch} float32 tol={args.tol:g}")
    header = ["method", "torch_best_s", "cpu_best_s", "speedup_best", "torch_median_s", "cpu_median_s"]
    header += ["speedup_median", "max_abs_diff", "iters_torch", "iters_cpu"]
    row_format = "{:<7} {:>12} {:>10} {:>12} {:>14} {:>12} {:>14} {:>12} {:>11} {:>9}"
    print(row_format.format(*header))
    rows = []
    for method in args.methods:
        problem, _ = pack(outputs, teachers, inputs="probs", value_kind=METHODS[method])
        t_ref, t_cpu, sol_ref, sol_cpu = timed_pair(
            lambda m=method, p=problem: ref.solvers[m](p, args.tol, None),
            lambda m=method, p=problem: cpu.solvers[m](p, args.tol, None),
            args.repeats,
        )
        best = (min(t_ref), min(t_cpu))
        median = (statistics.median(t_ref), statistics.median(t_cpu))
        diff = float((sol_ref.soft - sol_cpu.soft).abs().max())
        its = ["-" if s.iterations is None else f"{float(s.iterations.float().mean()):.1f}" for s in (sol_ref, sol_cpu)]
        row = [method, f"{best[0]:.4f}", f"{best[1]:.4f}", f"{best[0] / best[1]:.1f}"]
        row += [f"{median[0]:.4f}", f"{median[1]:.4f}", f"{median[0] / median[1]:.1f}", f"{diff:.2e}", *its]
        rows.append(row)
        print(row_format.format(*row), flush=True)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([f"# {machine}; K={args.classes} N={args.teachers} B={args.batch} tol={args.tol:g}"])
            writer.writerow(header)
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
