"""The compiled CPU backend against the torch reference, a plain MM loop and the memory floor.

Workloads (``benchmarks/workloads.py``), float32, tol 1e-5:

* ``subsets`` (primary, the paper's setting): K=1000 classes, N=20 teachers, each covering a random
  subset of the classes, its coverage drawn per source from U(12.5%, 37.5%) (mean 25%), B=8192.
* ``windows`` (secondary, the earlier benchmarks' family): the same K, N and mean coverage as
  overlapping windows of a shuffled class order (few distinct teacher sets).
* ``unequal``: K=5000, N=8, two large sources (40-70% of the classes) and six small ones (0.5-5%).

For each workload and method, in one process, with every contender's repetitions interleaved
(contender A, B, C, A, B, C, ...) so that a burst of load on a shared machine hits them all:

* ``cpu e2e``: ``uhc_fast.estimate(...)`` from the float32 tensors on the default CPU path;
* ``cpu solve``: the CPU backend's ``solve`` of the already converted batch (what ``estimate`` adds
  on top is the argument checks, the conversion to a Batch, the backend choice and the info dict);
* ``torch e2e`` / ``torch solve``: the same for the torch reference, which computes in float64
  (its state, and its packed values) and is therefore slower than the float32 reference was;
* ``MM f32`` / ``MM f64`` (`ce` only): the plain torch MM loop of ``baselines.mm_ce`` from the teachers'
  tensors, to the same relative KKT residual (its only stopping test: a weaker one than estimate's);
* ``copy``: reading every input once and writing a fresh (B, K) output (``baselines.copy_floor``).

`mf-p` and `mf-lu` rows run at ``--slow-batch`` samples (the reference takes about 30 ms per sample
there); the per-ISA and per-dtype tables run the CPU backend alone, at the full batch (``--cpu-slow-batch``
for `mf-p` and `mf-lu`). Every `ce`
answer's relative KKT residual is recomputed in float64 (``baselines.relative_kkt``).

    python benchmarks/bench_native.py                    # everything (about 15 minutes on 2 cores)
    python benchmarks/bench_native.py --quick            # B=1024, 3 repetitions (about 3 minutes)
    python benchmarks/bench_native.py --workloads subsets --methods ce --no-isa --no-dtypes

Writes ``benchmarks/results/<tag>.csv`` and ``.md`` (tag ``native_cpu_vs_torch``, or
``native_cpu_vs_torch_quick`` with ``--quick``), the machine, versions and commit on every row.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import uhc_fast
from uhc_fast import backends
from uhc_fast.backends.native_launch import KIND_CODES, launch_cpu
from uhc_fast.constants import DEFAULT_MAX_ITER
from uhc_fast.inputs import Batch, convert
from uhc_fast.methods import METHODS, Method

from . import baselines, machine, workloads

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = {
    "subsets": {"family": "subsets", "K": 1000, "N": 20, "fraction": 0.25},
    "windows": {"family": "windows", "K": 1000, "N": 20, "fraction": 0.25},
    "unequal": {"family": "unequal", "K": 5000, "N": 8, "fraction": None},
}
# MM needs hundreds of iterations on the unequal workload (1,600 for its slowest rows, half a minute
# or more per call): there it runs once, without warm-up, on the first 128 samples; the tables compare
# samples per second
MM_BATCH = {"unequal": 128}
# MM's timed calls (after a warm-up call, except where one call takes minutes)
MM_ROUNDS = {"unequal": 1}
SLOW = ("mf-p", "mf-lu")  # methods whose torch reference costs tens of ms per sample
INPUT_DTYPES = ("float32", "float16", "bfloat16", "numpy float32")


# ---------------------------------------------------------------------- timing
@dataclass
class Contender:
    """One thing to time: a zero-argument callable and what its result means."""

    name: str
    call: Callable[[], object]
    batch: int | None = None  # samples per call, when not the row's
    rounds: int | None = None  # timed calls at most (None: every round)
    warmup: bool = True
    times: list[float] = field(default_factory=list)
    result: object = None

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def rate(self, which: str) -> float:
        """Samples per second at the best or median time."""
        return self.batch / (self.best if which == "best" else self.median)


def interleaved(contenders: list[Contender], repeats: int, budget_s: float) -> int:
    """One warm-up call each, then rounds of one call each (in order) until ``repeats`` rounds or,
    past three rounds, ``budget_s`` seconds; returns the rounds run. Keeps each contender's last result.
    A contender with ``rounds`` set sits out the rounds after its first ``rounds``."""
    for c in contenders:
        if c.warmup:
            c.result = c.call()
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats and (rounds < 3 or time.perf_counter() - start < budget_s):
        for c in contenders:
            if c.rounds is not None and len(c.times) >= c.rounds:
                continue
            c.result = None  # free the previous output first
            t0 = time.perf_counter()
            c.result = c.call()
            c.times.append(time.perf_counter() - t0)
        rounds += 1
    return rounds


# ---------------------------------------------------------------------- calls
def launch_args(batch: Batch, spec: Method) -> tuple:
    """The positional arguments of ``native_launch.launch_cpu`` for ``batch`` (as the CPU backend builds them)."""
    options, device = batch.options, batch.device
    teachers = batch.solved_teachers
    layout = teachers.layout(device)
    weights = batch.solved_weights(torch.float64, device).contiguous()
    system = layout.mf_lf_system(weights, torch.float64) if spec.needs_system else weights.new_zeros(0, 0)
    kinds = [KIND_CODES[k] for k in batch.kinds] + [KIND_CODES["probs"]] * (teachers.num_teachers - len(batch.kinds))
    out_dtype = torch.float32 if batch.compute_dtype == torch.float32 else torch.float64
    return (
        batch.tensors,
        kinds,
        layout.structure,
        weights,
        system,
        spec.name,
        out_dtype,
        options.temperature,
        options.eps,
        options.tol_for(out_dtype),
        options.iteration_cap(),
    )


@dataclass
class Answer:
    """What a contender returned, in one shape: soft labels and (iterative methods) diagnostics."""

    soft: torch.Tensor
    iterations: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    converged: torch.Tensor | None = None


def answer(name: str, result, method: str) -> Answer | None:
    """``result`` of contender ``name`` as an Answer (diagnostics only for iterative methods)."""
    got = _answer(name, result)
    if got is not None and not METHODS[method].iterative:
        got = Answer(got.soft)
    return got


def _answer(name: str, result) -> Answer | None:
    if result is None or name == "copy":
        return None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):  # estimate(..., return_info)
        soft, info = result
        return Answer(torch.as_tensor(soft), info.get("iterations"), info.get("residual"), info.get("converged"))
    if isinstance(result, tuple) and name.startswith("MM"):
        return Answer(result[0], result[1])
    if isinstance(result, tuple):  # launch_cpu outputs
        soft, iterations, converged, residual = result[:4]
        return Answer(soft, iterations, residual, converged)
    return Answer(result.soft, result.iterations, result.residual, result.converged)  # a Solution


@dataclass
class IsaSwitch:
    """Run a call with ``UHC_FAST_CPU_ISA`` set (the CPU module reads it on every call)."""

    isa: str

    def __call__(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            saved = os.environ.get("UHC_FAST_CPU_ISA")
            os.environ["UHC_FAST_CPU_ISA"] = self.isa
            try:
                return fn()
            finally:
                if saved is None:
                    del os.environ["UHC_FAST_CPU_ISA"]
                else:
                    os.environ["UHC_FAST_CPU_ISA"] = saved

        return run


# ---------------------------------------------------------------------- tables
def main_rows(work: workloads.Workload, name: str, method: str, batch: int, args, stamp: dict) -> list[dict]:
    """The main table's contenders for one workload and method, timed interleaved."""
    spec = METHODS[method]
    outputs = [o[:batch] for o in work.outputs]
    teachers = work.teachers
    tol = args.tol
    cpu, ref = backends.load("cpu"), backends.load("torch")
    cpu_batch = work.convert(method, "cpu", tol, rows=batch)
    ref_batch = work.convert(method, "torch", tol, rows=batch)
    contenders = [
        Contender("cpu e2e", lambda: uhc_fast.estimate(outputs, teachers, method, tol=tol, return_info=True)),
        Contender("cpu solve", lambda: cpu.solve(cpu_batch, spec)),
        Contender(
            "torch e2e",
            lambda: uhc_fast.estimate(outputs, teachers, method, tol=tol, backend="torch", return_info=True),
        ),
        Contender("torch solve", lambda: ref.solve(ref_batch, spec)),
    ]
    if method == "ce" and not args.no_mm:
        rows = min(batch, MM_BATCH.get(name, batch))
        head = [o[:rows] for o in outputs]
        for dtype, label in ((torch.float32, "MM f32"), (torch.float64, "MM f64")):
            call = lambda d=dtype: baselines.mm_ce(head, teachers, tol, dtype=d)
            single = MM_ROUNDS.get(name)
            contenders.append(Contender(label, call, batch=rows, rounds=single or 3, warmup=single is None))
    contenders.append(Contender("copy", lambda: baselines.copy_floor(outputs, work.num_classes)))
    rounds = interleaved(contenders, args.repeats, args.budget)
    return summarise(contenders, work, name, method, batch, rounds, outputs, stamp, "float32", "")


def summarise(contenders, work, name, method, batch, rounds, outputs, stamp, input_dtype, isa) -> list[dict]:
    """One CSV row per contender, with the answers' diagnostics and the cpu rows' ratios."""
    stats = work.stats
    reference = next((c for c in contenders if c.name == "torch e2e"), None)
    ref_soft = answer(reference.name, reference.result, method).soft.double() if reference else None
    by_name = {c.name: c for c in contenders}
    rows = []
    for c in contenders:
        c.batch = c.batch or batch
        row = {
            "workload": name,
            "family": work.family,
            "K": work.num_classes,
            "N": work.num_teachers,
            "nnz": stats["nnz"],
            "G": stats["G"],
            "E": stats["E"],
            "d2_classes": stats["d2_classes"],
            "d2_groups": stats["d2_groups"],
            "B": c.batch,
            "method": method,
            "contender": c.name,
            "input_dtype": input_dtype,
            "isa": isa,
            "repeats": len(c.times),
            "best_s": c.best,
            "median_s": c.median,
            "samples_per_s_best": c.rate("best"),
            "samples_per_s_median": c.rate("median"),
        }
        got = answer(c.name, c.result, method)
        if got is not None:
            if got.iterations is not None:
                it = got.iterations.double()
                row.update(iters_mean=float(it.mean()), iters_max=int(it.max()))
            if got.converged is not None:
                row["converged_frac"] = float(got.converged.double().mean())
            if got.residual is not None:
                row["residual_max"] = float(got.residual.double().max())
            if method == "ce":
                kkt = baselines.relative_kkt(got.soft, [o[: c.batch] for o in outputs], work.teachers)
                row["kkt_rel_max"] = float(kkt.max())
                row["kkt_rel_p99"] = float(kkt.quantile(0.99))
            if ref_soft is not None:
                row["max_abs_diff_vs_torch"] = float((got.soft.double() - ref_soft[: c.batch]).abs().max())
        row["floor_bytes"] = baselines.floor_bytes([o[: c.batch] for o in outputs], work.num_classes)
        row["gbytes_per_s_best"] = row["floor_bytes"] / c.best / 1e9
        rows.append(row)
    # ratios on the cpu rows: how many times faster than each baseline (best over best, median over median)
    for row in rows:
        mine = by_name[row["contender"]]
        pairs = {
            "cpu e2e": {"torch": "torch e2e", "mm32": "MM f32", "mm64": "MM f64", "solve": "cpu solve"},
            "cpu solve": {"torch": "torch solve"},
            "torch e2e": {"solve": "torch solve"},
        }.get(row["contender"], {})
        for key, other in pairs.items():
            if other not in by_name:
                continue
            base = by_name[other]
            for which in ("best", "median"):  # ratios of rates: contenders may run different batches
                if key == "solve":  # the cost of estimate over the backend's solve (a factor >= 1)
                    row[f"e2e_over_solve_{which}"] = base.rate(which) / mine.rate(which)
                else:
                    row[f"x_{key}_{which}"] = mine.rate(which) / base.rate(which)
        if "copy" in by_name and row["contender"] != "copy":
            for which in ("best", "median"):
                row[f"pct_copy_rate_{which}"] = 100 * mine.rate(which) / by_name["copy"].rate(which)
    for row in rows:
        row.update(stamp)
    return rows


def isa_rows(work, name, method, batch, args, stamp) -> list[dict]:
    """Solve-only (``launch_cpu(isa=...)``) and end to end (``UHC_FAST_CPU_ISA``) per instruction set."""
    module = backends.native.load_module("cpu")
    isas = [isa for isa, entry in module.isas().items() if entry["supported"]]
    outputs = [o[:batch] for o in work.outputs]
    spec = METHODS[method]
    launch = launch_args(work.convert(method, "cpu", args.tol, rows=batch), spec)
    contenders = []
    for isa in isas:
        contenders.append(Contender(f"{isa} solve", lambda i=isa: launch_cpu(*launch, isa=i)))
        contenders.append(
            Contender(
                f"{isa} e2e",
                IsaSwitch(isa)(
                    lambda: uhc_fast.estimate(outputs, work.teachers, method, tol=args.tol, return_info=True)
                ),
            )
        )
    contenders.append(Contender("copy", lambda: baselines.copy_floor(outputs, work.num_classes)))
    rounds = interleaved(contenders, args.repeats, args.budget)
    rows = summarise(contenders, work, name, method, batch, rounds, outputs, stamp, "float32", "")
    base = {r["contender"].split()[1]: r for r in rows if r["contender"].startswith("baseline")}
    for row in rows:
        if row["contender"] == "copy":
            continue
        row["isa"], phase = row["contender"].split()
        if phase in base:
            row["x_baseline_best"] = base[phase]["best_s"] / row["best_s"]
            row["x_baseline_median"] = base[phase]["median_s"] / row["median_s"]
    return rows


def dtype_rows(work, name, method, batch, args, stamp) -> list[dict]:
    """CPU backend solve and estimate end to end per input dtype (float32/16, bfloat16 torch; float32 numpy)."""
    spec = METHODS[method]
    cpu = backends.load("cpu")
    rows = []
    contenders, meta = [], {}
    for label in INPUT_DTYPES:
        if label.startswith("numpy"):
            outputs = [o[:batch].numpy() for o in work.outputs]
        else:
            outputs = [o[:batch].to(getattr(torch, label)) for o in work.outputs]
        converted = convert(outputs, work.teachers, uhc_fast.Options(method=method, tol=args.tol))
        contenders.append(Contender(f"{label} solve", lambda b=converted: cpu.solve(b, spec)))
        contenders.append(
            Contender(
                f"{label} e2e",
                lambda o=outputs: uhc_fast.estimate(o, work.teachers, method, tol=args.tol, return_info=True),
            )
        )
        contenders.append(Contender(f"{label} copy", lambda o=outputs: baselines.copy_floor(o, work.num_classes)))
        meta[label] = outputs
    rounds = interleaved(contenders, args.repeats, args.budget)
    for label in INPUT_DTYPES:
        mine = [c for c in contenders if c.name.startswith(label + " ")]
        for c in mine:
            c.name = c.name[len(label) + 1 :]
            if c.name == "e2e":
                c.name = "cpu e2e"
            elif c.name == "solve":
                c.name = "cpu solve"
        part = summarise(mine, work, name, method, batch, rounds, meta[label], stamp, label, "")
        rows += part
    return rows


# ---------------------------------------------------------------------- report
def _rate(x) -> str:
    if x is None or x == "":
        return "–"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _x(row, key) -> str:
    best, median = row.get(f"{key}_best"), row.get(f"{key}_median")
    if best is None:
        return "–"
    return f"{best:.3g}× ({median:.3g}×)"


def _g(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}e}" if (x and (abs(x) < 1e-2 or abs(x) >= 1e4)) else f"{x:.3g}"


def _table(header, body) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def markdown(main: list[dict], isa: list[dict], dtypes: list[dict], stamp: dict, args, elapsed: float) -> str:
    lines = [
        "# Compiled CPU backend vs the torch reference, a plain MM loop and the memory floor",
        "",
        f"- Machine: {machine.machine_line(stamp)}; load {stamp['load_start']} at the start, "
        f"{stamp.get('load_end', '?')} at the end (1-minute averages: others share this VM).",
        f"- Software: uhc_fast {stamp['uhc_fast']} at commit `{stamp['commit']}`, native module "
        f"`{stamp['native_module']}` (default ISA {stamp['default_isa']}), Python {stamp['python']}, "
        f"torch {stamp['torch']}, numpy {stamp['numpy']}.",
        f"- float32 inputs, tol {args.tol:g}, max_iter {DEFAULT_MAX_ITER}; 1 warm-up + up to {args.repeats} "
        f"interleaved rounds per table row (at least 3; fewer than {args.repeats} past {args.budget:g} s); "
        f"the run took {elapsed:.0f} s: `{stamp['command']}`.",
        "- Ratios are best over best (median over median in brackets): how many times faster the first "
        "is. The torch reference computes in float64; MM is `baselines.mm_ce` (plain torch, two GEMMs "
        "per iteration, stops at the relative KKT residual alone). `kkt` is every `ce` answer's relative "
        "KKT residual recomputed in float64 (max over rows).",
        "",
        "## End to end and solve-only, every method",
        "",
    ]
    cpu_rows = {(r["workload"], r["method"], r["contender"]): r for r in main}
    body = []
    for r in main:
        if r["contender"] != "cpu e2e":
            continue
        key = (r["workload"], r["method"])
        solve = cpu_rows.get((*key, "cpu solve"), {})
        te2e = cpu_rows.get((*key, "torch e2e"), {})
        tsolve = cpu_rows.get((*key, "torch solve"), {})
        mm32 = cpu_rows.get((*key, "MM f32"), {})
        iters = "–" if r.get("iters_mean") is None else f"{r['iters_mean']:.2f} / {r['iters_max']}"
        kkt = "–" if r.get("kkt_rel_max") is None else f"{r['kkt_rel_max']:.1e} / {te2e.get('kkt_rel_max', 0):.1e}"
        if mm32.get("kkt_rel_max") is not None:
            kkt += f" / {mm32['kkt_rel_max']:.1e}"
        conv = "–" if r.get("converged_frac") is None else f"{100 * r['converged_frac']:.1f}%"
        body.append(
            [
                r["workload"],
                f"{r['K']}/{r['N']}",
                str(r["G"]),
                str(r["nnz"]),
                r["method"],
                str(r["B"]),
                f"{_rate(r['samples_per_s_best'])} ({_rate(r['samples_per_s_median'])})",
                f"{_rate(solve.get('samples_per_s_best'))} ({_rate(solve.get('samples_per_s_median'))})",
                f"{_rate(te2e.get('samples_per_s_best'))} ({_rate(te2e.get('samples_per_s_median'))})",
                f"{_rate(tsolve.get('samples_per_s_best'))} ({_rate(tsolve.get('samples_per_s_median'))})",
                _x(r, "x_torch"),
                _x(solve, "x_torch"),
                _x(r, "x_mm32"),
                _x(r, "x_mm64"),
                "–"
                if r.get("e2e_over_solve_best") is None
                else f"{r['e2e_over_solve_best']:.2f} ({r['e2e_over_solve_median']:.2f})",
                "–" if r.get("pct_copy_rate_best") is None else f"{r['pct_copy_rate_best']:.0f}%",
                iters,
                conv,
                kkt,
                _g(r.get("max_abs_diff_vs_torch")),
            ]
        )
    header = [
        "workload",
        "K/N",
        "G",
        "nnz",
        "method",
        "B",
        "cpu e2e /s",
        "cpu solve /s",
        "torch e2e /s",
        "torch solve /s",
        "e2e × torch",
        "solve × torch",
        "e2e × MM f32",
        "e2e × MM f64",
        "e2e / solve",
        "% copy rate",
        "iters mean / max",
        "conv",
        "kkt cpu / torch / MM",
        "max abs Δ vs torch",
    ]
    lines += _table(header, body)
    mm = [r for r in main if r["contender"].startswith("MM") or r["contender"] == "copy"]
    if mm:
        lines += [
            "",
            "Baselines in the same rounds (samples/s best (median); MM's iterations; copy: GB/s of the floor traffic):",
            "",
        ]
        body = []
        for r in mm:
            its = "–" if r.get("iters_mean") is None else f"{r['iters_mean']:.1f} / {r['iters_max']}"
            body.append(
                [
                    r["workload"],
                    r["method"],
                    r["contender"],
                    str(r["B"]),
                    f"{_rate(r['samples_per_s_best'])} ({_rate(r['samples_per_s_median'])})",
                    its,
                    "–" if r.get("kkt_rel_max") is None else f"{r['kkt_rel_max']:.2e}",
                    f"{r['gbytes_per_s_best']:.3g}" if r["contender"] == "copy" else "–",
                ]
            )
        lines += _table(
            ["workload", "method", "baseline", "B", "samples/s", "iters mean / max", "kkt max", "GB/s"], body
        )
    if isa:
        lines += ["", "## Per instruction set (CPU backend alone, full batch)", ""]
        body = []
        for r in isa:
            if r["contender"] == "copy":
                continue
            body.append(
                [
                    r["workload"],
                    r["method"],
                    str(r["B"]),
                    r["isa"],
                    r["contender"].split()[1],
                    f"{_rate(r['samples_per_s_best'])} ({_rate(r['samples_per_s_median'])})",
                    _x(r, "x_baseline"),
                    "–" if r.get("pct_copy_rate_best") is None else f"{r['pct_copy_rate_best']:.0f}%",
                    "–" if r.get("iters_mean") is None else f"{r['iters_mean']:.2f}",
                ]
            )
        lines += _table(
            ["workload", "method", "B", "ISA", "phase", "samples/s", "× baseline ISA", "% copy rate", "iters"], body
        )
    if dtypes:
        lines += ["", "## Input dtypes: estimate end to end over the backend's solve (CPU backend)", ""]
        body = []
        by = {(r["workload"], r["method"], r["input_dtype"], r["contender"]): r for r in dtypes}
        for (wl, method, dt, contender), r in by.items():
            if contender != "cpu e2e":
                continue
            solve = by.get((wl, method, dt, "cpu solve"), {})
            copy = by.get((wl, method, dt, "copy"), {})
            body.append(
                [
                    wl,
                    method,
                    dt,
                    str(r["B"]),
                    f"{_rate(r['samples_per_s_best'])} ({_rate(r['samples_per_s_median'])})",
                    f"{_rate(solve.get('samples_per_s_best'))} ({_rate(solve.get('samples_per_s_median'))})",
                    f"{r['e2e_over_solve_best']:.2f} ({r['e2e_over_solve_median']:.2f})"
                    if "e2e_over_solve_best" in r
                    else "–",
                    f"{_rate(copy.get('samples_per_s_best'))}",
                    f"{r['pct_copy_rate_best']:.0f}% ({r['pct_copy_rate_median']:.0f}%)"
                    if "pct_copy_rate_best" in r
                    else "–",
                ]
            )
        header = [
            "workload",
            "method",
            "inputs",
            "B",
            "e2e /s",
            "solve /s",
            "e2e / solve",
            "copy floor /s",
            "e2e % of copy rate",
        ]
        lines += _table(header, body)
    return "\n".join(lines) + "\n"


STAMP_COLUMNS = (
    "date",
    "cpu_model",
    "cpu_cores",
    "torch_threads",
    "load_start",
    "load_end",
    "python",
    "torch",
    "numpy",
    "uhc_fast",
    "commit",
    "native_module",
    "default_isa",
    "tol",
    "command",
)
COLUMNS = (
    "table",
    "workload",
    "family",
    "K",
    "N",
    "nnz",
    "G",
    "E",
    "d2_classes",
    "d2_groups",
    "B",
    "method",
    "contender",
    "input_dtype",
    "isa",
    "repeats",
    "best_s",
    "median_s",
    "samples_per_s_best",
    "samples_per_s_median",
    "x_torch_best",
    "x_torch_median",
    "x_mm32_best",
    "x_mm32_median",
    "x_mm64_best",
    "x_mm64_median",
    "x_baseline_best",
    "x_baseline_median",
    "e2e_over_solve_best",
    "e2e_over_solve_median",
    "pct_copy_rate_best",
    "pct_copy_rate_median",
    "floor_bytes",
    "gbytes_per_s_best",
    "iters_mean",
    "iters_max",
    "converged_frac",
    "residual_max",
    "kkt_rel_max",
    "kkt_rel_p99",
    "max_abs_diff_vs_torch",
    *STAMP_COLUMNS,
)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=1024 (slow methods 128), 3 rounds")
    parser.add_argument("--batch", type=int, default=None, help="samples per call (default 8192; quick 1024)")
    parser.add_argument(
        "--slow-batch", type=int, default=None, help="samples per call of mf-p/mf-lu vs torch (512; quick 128)"
    )
    parser.add_argument(
        "--cpu-slow-batch", type=int, default=None, help="samples per call of mf-p/mf-lu, CPU alone (2048; quick 256)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per row (default 5; quick 3)")
    parser.add_argument(
        "--budget", type=float, default=60.0, help="seconds per row after which rounds stop (at least 3)"
    )
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--workloads", nargs="+", choices=tuple(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--no-mm", action="store_true", help="skip the MM baselines")
    parser.add_argument("--no-isa", action="store_true", help="skip the per-instruction-set table")
    parser.add_argument("--no-dtypes", action="store_true", help="skip the input-dtype table")
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads (default: usable cores)")
    parser.add_argument(
        "--native",
        type=Path,
        default=None,
        help="load uhc_fast._native_cpu from this file (a copy: the in-place build may be replaced during a run)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    args.batch = args.batch or (1024 if args.quick else 8192)
    args.slow_batch = min(args.batch, args.slow_batch or (128 if args.quick else 512))
    args.cpu_slow_batch = min(args.batch, args.cpu_slow_batch or (256 if args.quick else 2048))
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.tag = args.tag or ("native_cpu_vs_torch_quick" if args.quick else "native_cpu_vs_torch")
    return args


def use_native(path: Path) -> None:
    """Import the compiled CPU module from ``path`` before anything loads the built-in one."""
    import importlib.util

    if "uhc_fast._native_cpu" in sys.modules:
        raise RuntimeError("uhc_fast._native_cpu is already loaded")
    spec = importlib.util.spec_from_file_location("uhc_fast._native_cpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["uhc_fast._native_cpu"] = module
    spec.loader.exec_module(module)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.native is not None:
        use_native(args.native)
    torch.set_num_threads(args.threads or machine.usable_cores())
    stamp = machine.describe()
    stamp.update(
        load_start=stamp.pop("load_avg", ""),
        default_isa=backends.native.load_module("cpu").default_isa(),
        tol=args.tol,
        command=" ".join(["python benchmarks/bench_native.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    print(
        f"# {machine.machine_line({**stamp, 'load_avg': stamp['load_start']})}; torch {stamp['torch']}; "
        f"commit {stamp['commit']}; native {stamp['native_module']}",
        flush=True,
    )
    started = time.perf_counter()
    main_table, isa_table, dtype_table = [], [], []
    for name in args.workloads:
        spec = WORKLOADS[name]
        work = workloads.make(args.batch, spec["K"], spec["N"], family=spec["family"], fraction=spec["fraction"])
        print(f"## {name}: {work.stats}", flush=True)
        for method in args.methods:
            batch = args.slow_batch if method in SLOW else args.batch
            cpu_batch = args.cpu_slow_batch if method in SLOW else args.batch
            rows = main_rows(work, name, method, batch, args, stamp)
            for r in rows:
                r["table"] = "main"
                _print(r)
            main_table += rows
            if not args.no_isa:
                rows = isa_rows(work, name, method, cpu_batch, args, stamp)
                for r in rows:
                    r["table"] = "isa"
                    _print(r)
                isa_table += rows
            if not args.no_dtypes and name == args.workloads[0]:
                rows = dtype_rows(work, name, method, cpu_batch, args, stamp)
                for r in rows:
                    r["table"] = "dtype"
                    _print(r)
                dtype_table += rows
    elapsed = time.perf_counter() - started
    load_end = machine.load_average()
    for row in (*main_table, *isa_table, *dtype_table):
        row["load_end"] = load_end
    stamp["load_end"] = load_end
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv([*main_table, *isa_table, *dtype_table], args.out / f"{args.tag}.csv")
    (args.out / f"{args.tag}.md").write_text(markdown(main_table, isa_table, dtype_table, stamp, args, elapsed))
    print(f"wrote {args.out / (args.tag + '.csv')} and .md in {elapsed:.0f} s", flush=True)
    return 0


def _print(r: dict) -> None:
    extra = ""
    for key in ("x_torch", "x_mm32", "x_baseline"):
        if r.get(f"{key}_best") is not None:
            extra += f" {key} {r[f'{key}_best']:.2f}/{r[f'{key}_median']:.2f}"
    if r.get("e2e_over_solve_best") is not None:
        extra += f" e2e/solve {r['e2e_over_solve_best']:.2f}"
    if r.get("iters_mean") is not None:
        extra += f" iters {r['iters_mean']:.2f}/{r['iters_max']}"
    if r.get("kkt_rel_max") is not None:
        extra += f" kkt {r['kkt_rel_max']:.1e}"
    print(
        f"  {r['workload']:<8} {r['method']:<6} {r['input_dtype']:<14} {r['contender']:<13} B={r['B']:<5} "
        f"{r['samples_per_s_best']:>10.4g}/s best {r['samples_per_s_median']:>10.4g}/s median{extra}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
