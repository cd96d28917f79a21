"""Merging teachers' top-k outputs (``uhc_fast.estimate_topk``): throughput and accuracy.

Two tables, written to ``benchmarks/results/topk.md`` (and printed):

1. **Throughput** at the issue's workload: N = 4 teachers, k = 64 ids each, a 150k-id vocabulary,
   B = 16384 samples, float32 probabilities, on the compiled CPU backend (1 and 2 threads) next to
   the torch reference, `ce` and `sd`. Each teacher's top-k comes from its own noisy view of a
   per-sample distribution over 200 candidate ids, so the teachers overlap partly (a mean union of
   about 80 ids). Repetitions of the backends alternate; best and median wall times are given, and
   the CPU time per sample (which the machine's other load does not inflate).
2. **Accuracy** against a known truth: per sample a Zipf-like distribution over a random 400-id
   support of the vocabulary; each teacher ranks by its own noisy view of it and reports, over its
   top-k, the true probabilities renormalised (``noise = 0``: the setting of the issue) or a
   noisy version of them (log-normal, ``noise`` = sigma). Both methods are scored against the
   truth renormalised over each sample's union (where their mass is): total variation distance
   and KL(truth || estimate), averaged over samples.

    python benchmarks/bench_topk.py            # both tables (a few minutes on 2 cores)
    python benchmarks/bench_topk.py --quick    # smaller B, fewer repetitions
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uhc_fast
from benchmarks.machine import describe, machine_line

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------- workloads
def distinct_ids(rng: np.random.Generator, batch: int, count: int, vocab: int) -> np.ndarray:
    """``(batch, count)`` ids, distinct within each row: an arithmetic progression mod ``vocab``."""
    start = rng.integers(0, vocab, size=(batch, 1))
    step = rng.integers(1, vocab // count, size=(batch, 1))
    return (start + np.arange(count)[None, :] * step) % vocab


def throughput_workload(batch=16384, teachers=4, k=64, vocab=150_000, candidates=200, seed=0):
    """Teachers' top-k ids and renormalised float32 probabilities from their own noisy views."""
    rng = np.random.default_rng(seed)
    base = distinct_ids(rng, batch, candidates, vocab)
    logits = 2.0 * rng.standard_normal((batch, candidates))
    ids, values = [], []
    for _ in range(teachers):
        view = logits + 0.5 * rng.standard_normal((batch, candidates))
        top = np.argpartition(-view, k - 1, axis=1)[:, :k]
        z = np.take_along_axis(view, top, 1)
        p = np.exp(z - z.max(1, keepdims=True))
        ids.append(torch.from_numpy(np.take_along_axis(base, top, 1)))
        values.append(torch.from_numpy((p / p.sum(1, keepdims=True)).astype(np.float32)))
    return ids, values


def truth_workload(batch, teachers, k, noise, vocab=150_000, support=400, seed=1):
    """``(ids, values, truth)``: teachers that rank by noisy views of a known distribution and report
    its probabilities over their top-k (renormalised), times log-normal noise of sigma ``noise``."""
    rng = np.random.default_rng(seed)
    base = distinct_ids(rng, batch, support, vocab)
    ranks = np.argsort(rng.random((batch, support)), axis=1) + 1
    truth = ranks**-1.1  # Zipf-like masses in a random order over the support
    truth /= truth.sum(1, keepdims=True)
    ids, values = [], []
    for _ in range(teachers):
        view = np.log(truth) + 0.7 * rng.standard_normal(truth.shape)
        top = np.argpartition(-view, k - 1, axis=1)[:, :k]
        p = np.take_along_axis(truth, top, 1) * np.exp(noise * rng.standard_normal((batch, k)))
        ids.append(np.take_along_axis(base, top, 1))
        values.append(p / p.sum(1, keepdims=True))
    return ids, values, (base, truth)


def score(got_ids, soft, base, truth) -> tuple[float, float]:
    """Mean total variation and KL(truth || estimate) against the truth renormalised over each
    sample's union (the estimate's support)."""
    order = np.argsort(base, axis=1)
    sorted_base = np.take_along_axis(base, order, 1)
    listed = got_ids >= 0
    where = np.empty_like(got_ids)
    for b in range(got_ids.shape[0]):  # (vectorised per row: searchsorted has no batch form)
        where[b] = order[b][np.searchsorted(sorted_base[b], np.maximum(got_ids[b], 0))]
    true = np.where(listed, np.take_along_axis(truth, where, 1), 0.0)
    true /= true.sum(1, keepdims=True)
    est = np.where(listed, soft, 0.0)
    tv = 0.5 * np.abs(true - est).sum(1)
    kl = np.where(
        listed & (true > 0), true * (np.log(np.maximum(true, 1e-300)) - np.log(np.maximum(est, 1e-300))), 0
    ).sum(1)
    return float(tv.mean()), float(kl.mean())


# ---------------------------------------------------------------------- measurements
def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def throughput(batch: int, repeats: int, reference_repeats: int) -> list[dict]:
    ids, values = throughput_workload(batch=batch)
    rows = []
    saved = torch.get_num_threads()
    try:
        for method in ("ce", "sd"):
            for threads in (2, 1):
                torch.set_num_threads(threads)
                timings = {"cpu": [], "torch": []}
                cpu_time = {"cpu": [], "torch": []}
                uhc_fast.estimate_topk(ids, values, method, backend="cpu")  # warm up
                for rep in range(repeats):
                    for backend in ("cpu", "torch"):
                        if backend == "torch" and (threads == 1 or rep >= reference_repeats):
                            continue
                        c0, t0 = cpu_seconds(), time.perf_counter()
                        *_, info = uhc_fast.estimate_topk(ids, values, method, backend=backend, return_info=True)
                        timings[backend].append(time.perf_counter() - t0)
                        cpu_time[backend].append(cpu_seconds() - c0)
                for backend, ts in timings.items():
                    if not ts:
                        continue
                    best, median = min(ts), statistics.median(ts)
                    rows.append(
                        {
                            "method": method,
                            "backend": backend,
                            "threads": threads,
                            "best_s": best,
                            "median_s": median,
                            "samples_per_s_best": batch / best,
                            "samples_per_s_median": batch / median,
                            "cpu_us_per_sample": 1e6 * min(cpu_time[backend]) / batch,
                            "repeats": len(ts),
                            "mean_union": float(info["union_size"].float().mean()),
                            "max_union": info["max_union"],
                        }
                    )
    finally:
        torch.set_num_threads(saved)
    return rows


def accuracy(batch: int) -> list[dict]:
    rows = []
    for teachers, k in ((2, 16), (4, 16), (4, 64)):
        for noise in (0.0, 0.1, 0.3):
            ids, values, (base, truth) = truth_workload(batch, teachers, k, noise)
            row = {"teachers": teachers, "k": k, "noise": noise}
            for method in ("sd", "ce"):
                got_ids, soft, info = uhc_fast.estimate_topk(ids, values, method, return_info=True)
                tv, kl = score(got_ids, soft, base, truth)
                row[f"{method}_tv"], row[f"{method}_kl"] = tv, kl
            row["mean_union"] = float(info["union_size"].float().mean())
            row["disconnected"] = info["disconnected_samples"]
            rows.append(row)
    return rows


def markdown(machine: str, speed: list[dict], acc: list[dict], batch: int) -> str:
    lines = [
        "# estimate_topk: throughput and accuracy",
        "",
        f"{machine}",
        "",
        f"## Throughput: N=4, k=64, vocabulary 150k, B={batch}, float32 probabilities",
        "",
        "| method | backend | threads | best (samples/s) | median (samples/s) | CPU time per sample (us) | repeats |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in speed:
        lines.append(
            f"| {r['method']} | {r['backend']} | {r['threads']} | {r['samples_per_s_best']:,.0f} | "
            f"{r['samples_per_s_median']:,.0f} | {r['cpu_us_per_sample']:.2f} | {r['repeats']} |"
        )
    by = {(r["method"], r["backend"], r["threads"]): r for r in speed}
    for method in ("ce", "sd"):
        if (method, "torch", 2) in by:
            ratio = by[(method, "torch", 2)]["best_s"] / by[(method, "cpu", 2)]["best_s"]
            lines.append(
                f"\n`{method}`: compiled CPU backend {ratio:.1f}x the torch reference (2 threads, best of each)."
            )
    lines.append(f"\nMean union {speed[0]['mean_union']:.1f} ids, largest {speed[0]['max_union']}.")
    lines += [
        "",
        "## Accuracy against the true distribution (renormalised over each sample's union)",
        "",
        "| teachers | k | report noise | mean union | disconnected samples | sd: TV | ce: TV | sd: KL | ce: KL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in acc:
        lines.append(
            f"| {r['teachers']} | {r['k']} | {r['noise']:g} | {r['mean_union']:.1f} | {r['disconnected']} | "
            f"{r['sd_tv']:.4f} | {r['ce_tv']:.2e} | {r['sd_kl']:.4f} | {r['ce_kl']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B=4096 and 3 repetitions")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    batch = 4096 if args.quick else 16384
    repeats = 3 if args.quick else 7
    info = describe()
    machine = machine_line(info) + f"; load average {os.getloadavg()[0]:.2f} at the start"
    speed = throughput(batch, repeats, reference_repeats=2 if args.quick else 3)
    acc = accuracy(1024 if args.quick else 4096)
    text = markdown(machine, speed, acc, batch)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / ("topk_quick.md" if args.quick else "topk.md")).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
