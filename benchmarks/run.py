"""Benchmark runner: every method on every available backend, and the `ce` peers, on one grid of sizes.

    python -m benchmarks.run --quick            # CI / development grid (a few minutes on 2 cores)
    python -m benchmarks.run --full             # K 10..10,000 x N 2..100 x a B sweep
    python -m benchmarks.run --full --update-readme

The primary workload is the paper's: random class subsets, each teacher's coverage drawn per source
(``workloads.subsets``, mean coverage ``min(0.6, 5 / N)``: about five teachers per class, 25% subsets at
N = 20); the K and N sweeps and the B sweep use it. Secondary rows: overlapping windows (few distinct
teacher sets) and very unequal sources (a few large, many small). Every row reports ``G``, the number of
distinct teacher sets among the classes, which is what the compiled `ce` iterates over.

For each grid point (family, K classes, N teachers, B samples) and method it times two phases:
``solve``, the backend's ``solve`` of the converted batch (``Backend.solve``; for the torch reference
that includes its float64 packing, for the compiled backends their validating read of the teachers'
arrays), and ``estimate``, ``uhc_fast.estimate(...)`` end to end. It records throughput (samples/s;
median, quartiles, extremes), the compulsory-traffic bandwidth, peak memory, and for iterative
methods the iterations and the residual reached, the fraction of samples that converged, and the
largest difference from the torch reference's answer. The ``loss`` rows time the direct `ce` training
loss, forward and backward. The peers (scipy L-BFGS-B and choix on `ce`, one sample at a time) run
on a subsample of the same problems. Results go to ``benchmarks/results/<mode>.{csv,md}`` and two plots.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import uhc_fast
from uhc_fast import backends
from uhc_fast.backends.base import Backend
from uhc_fast.constants import default_tol
from uhc_fast.inputs import pack
from uhc_fast.methods import METHODS
from uhc_fast.options import BACKEND_NAMES
from uhc_fast.reference import direct_ce_loss

from . import machine, measure, peers, report, workloads

RESULTS = Path(__file__).resolve().parent / "results"
ALL_METHODS = (*METHODS, "loss")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# peer row names -> the ratio column they feed
PEERS = {"scipy": "scipy", **{f"choix-{solver}": "choix" for solver in peers.CHOIX_SOLVERS}}
PRIMARY = "subsets"


@dataclass(frozen=True)
class Grid:
    """A benchmark grid and its measurement settings.

    ``points`` are ``(family, K, N, B)`` with ``B = None`` for the steady batch (about
    ``target_elements`` packed values per call, then shrunk so one call takes about ``call_budget_s``).
    The K sweep is the primary family's points with ``N == base_n``, the N sweep those with
    ``K == base_k``, the B sweep the points at ``(base_k, base_n)`` with an explicit B; ``secondary``
    adds single ``(family, K, N)`` rows of the other families.
    """

    name: str
    ks: tuple[int, ...]
    ns: tuple[int, ...]
    bs: tuple[int, ...]
    base_k: int
    base_n: int
    product: bool  # every (K, N) pair, or only the two sweeps through (base_k, base_n)
    secondary: tuple[tuple[str, int, int], ...]
    target_elements: dict[str, int]
    max_batch: dict[str, int]
    min_batch: int
    warmup: int
    repeats: int
    call_budget_s: float
    measure_budget_s: float
    max_call_s: float
    peer_samples: int
    peer_budget_s: float
    choix_scale: float
    choix_max_work: float  # skip choix above this many Python steps per iteration (scale * nnz)
    phases: tuple[str, ...]
    b_sweep_methods: tuple[str, ...] = ALL_METHODS

    def points(self) -> list[tuple[str, int, int, int | None]]:
        if self.product:
            pairs = {(k, n) for k in self.ks for n in self.ns}
        else:
            pairs = {(k, self.base_n) for k in self.ks} | {(self.base_k, n) for n in self.ns}
        steady = sorted(((PRIMARY, k, n, None) for k, n in pairs), key=lambda p: (p[1], p[2]))
        steady += [(family, k, n, None) for family, k, n in self.secondary]
        return steady + [(PRIMARY, self.base_k, self.base_n, b) for b in self.bs]


GRIDS = {
    "quick": Grid(
        name="quick",
        ks=(10, 100, 1000),
        ns=(2, 10, 50),
        bs=(1, 8, 64, 512),
        base_k=1000,
        base_n=10,
        product=False,
        secondary=(("windows", 1000, 10), ("unequal", 5000, 8)),
        target_elements={"cpu": 1 << 21, "cuda": 1 << 22},
        max_batch={"cpu": 1 << 14, "cuda": 1 << 18},
        min_batch=4,
        warmup=1,
        repeats=3,
        call_budget_s=0.15,
        measure_budget_s=1.0,
        max_call_s=3.0,
        peer_samples=4,
        peer_budget_s=1.5,
        choix_scale=100.0,
        choix_max_work=3e4,
        phases=("solve", "estimate"),
        b_sweep_methods=("sd", "ce", "mf-lf"),
    ),
    "full": Grid(
        name="full",
        ks=(10, 100, 1000, 10000),
        ns=(2, 10, 100),
        bs=(1, 4, 16, 64, 256, 1024, 4096),
        base_k=1000,
        base_n=10,
        product=True,
        secondary=(("windows", 1000, 10), ("windows", 1000, 20), ("unequal", 1000, 8), ("unequal", 5000, 8)),
        target_elements={"cpu": 1 << 23, "cuda": 1 << 25},
        max_batch={"cpu": 1 << 17, "cuda": 1 << 20},
        min_batch=8,
        warmup=2,
        repeats=7,
        call_budget_s=0.3,
        measure_budget_s=4.0,
        max_call_s=10.0,
        peer_samples=16,
        peer_budget_s=8.0,
        choix_scale=300.0,
        choix_max_work=1e5,
        phases=("solve", "estimate"),
        b_sweep_methods=("sd", "ce", "mf-lf", "loss"),
    ),
}

# choix's spectral solvers factor a dense K x K matrix.
CHOIX_MAX_CLASSES = 3000


@dataclass
class Target:
    """A backend on a device: what gets benchmarked."""

    name: str
    backend: Backend
    device: torch.device

    @property
    def label(self) -> str:
        return f"{self.name}/{self.device.type}"


@dataclass
class State:
    """What the run has learnt so far: reference answers (for agreement) and costs (for skips)."""

    reference: dict[tuple, torch.Tensor] = field(default_factory=dict)
    cost: dict[tuple, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(nnz, s/sample)]
    too_slow: dict[tuple, tuple[int, float]] = field(default_factory=dict)  # key -> (nnz, s/call) over the cap

    def skip_reason(self, key: tuple, nnz: int, calls: int, max_call_s: float) -> str | None:
        """Why a call of ``calls`` samples at ``nnz`` is not worth making, or None.

        Skipped when the same target already went over ``max_call_s`` per call at a size <= nnz, or
        when the per-sample cost measured at smaller sizes, scaled linearly in nnz, predicts more than
        5 x ``max_call_s`` (a loose factor: small calls are dominated by per-call overhead, which
        does not grow with nnz, so the linear scaling overstates the cost).
        """
        if key in self.too_slow and self.too_slow[key][0] <= nnz:
            n, seconds = self.too_slow[key]
            return f"skipped: one call took {seconds:.3g} s already at nnz={n}"
        known = [t * nnz / n for n, t in self.cost.get(key, []) if n <= nnz]
        if known and min(known) * calls > 5 * max_call_s:
            return f"skipped: predicted {min(known) * calls:.2g} s per call from smaller sizes"
        return None


# ---------------------------------------------------------------------- discovery
def discover(names: list[str] | None, devices: list[str], allow_interpret: bool) -> tuple[list[Target], list[str]]:
    """Every usable (backend, device) pair, torch first on each device, and notes on what was left out."""
    report_ = backends.info()
    notes = []
    targets = []
    for device_type in devices:
        if device_type == "cuda" and not torch.cuda.is_available():
            notes.append("cuda: no CUDA device")
            continue
        for name in ("torch", "cpu", "cuda", "triton"):
            if names and name not in names:
                continue
            entry = report_.get(name, {})
            if not entry.get("available"):
                if device_type == "cpu" or name != "cpu":
                    notes.append(f"{name}: unavailable ({entry.get('reason', 'unknown')})")
                continue
            if device_type not in entry.get("devices", ()):
                continue
            if name == "triton" and device_type == "cpu" and not allow_interpret:
                notes.append("triton/cpu: interpreter only, not benchmarked (--allow-interpret to force)")
                continue
            backend = backends.load(name)
            targets.append(Target(name, backend, torch.device(device_type)))
    seen = set()
    notes = [n for n in notes if not (n in seen or seen.add(n))]
    return targets, notes


# ---------------------------------------------------------------------- one measurement
def result_fields(method: str, solution, tol: float) -> dict:
    """Iterations / residual / converged fraction from a Solution (empty for closed forms)."""
    if method == "loss" or solution is None or getattr(solution, "iterations", None) is None:
        return {}
    it = solution.iterations.double()
    res = solution.residual.double()
    return {
        "iters_mean": float(it.mean()),
        "iters_max": int(it.max()),
        "residual_median": float(res.median()),
        "residual_max": float(res.max()),
        "converged_frac": float(solution.converged.double().mean())
        if getattr(solution, "converged", None) is not None
        else float((res <= tol).double().mean()),
        "tol": tol,
    }


def build_call(target: Target, method: str, phase: str, work: workloads.Workload, batch: int, tol: float):
    """The zero-argument call to time, or the reason this combination is not measured."""
    backend = target.backend
    outputs = [o[:batch] for o in work.outputs]
    if method == "loss":
        if phase != "solve":
            return "n/a: the loss has no estimate phase"
        if target.name != "torch" and backend.loss is direct_ce_loss:
            return "n/a: the backend's loss is the torch reference's"
        problem = pack(work.convert("ce", target.name, tol, rows=batch), "probs")
        gen = torch.Generator().manual_seed(3)
        logits = torch.randn(batch, work.num_classes, generator=gen, dtype=problem.values.dtype)
        logits = logits.to(target.device).requires_grad_(True)

        def run_loss():
            logits.grad = None
            value = backend.loss(logits, problem)
            value.sum().backward()
            return value.detach()

        return run_loss
    if method not in backend.methods:
        return "n/a: method not implemented by backend"
    if phase == "solve":
        converted = work.convert(method, target.name, tol, rows=batch)
        spec = METHODS[method]
        return lambda: backend.solve(converted, spec)
    return lambda: uhc_fast.estimate(outputs, work.teachers, method, backend=target.name, tol=tol, return_info=True)


def measure_one(
    target: Target,
    method: str,
    phase: str,
    work: workloads.Workload,
    batch: int,
    fixed_batch: bool,
    grid: Grid,
    state: State,
    tol: float,
) -> dict:
    """Size the batch, warm up, time the repeats, measure peak memory: one result row."""
    nnz = work.nnz
    row = {"method": method, "backend": target.name, "device": target.device.type, "phase": phase}
    key = (target.label, method, phase, work.family, work.num_teachers)
    calls = batch if fixed_batch else min(batch, grid.min_batch)
    reason = state.skip_reason(key, nnz, calls, grid.max_call_s)
    if reason is not None:
        row.update(batch=calls, status=reason)
        return row
    call = build_call(target, method, phase, work, calls, tol)
    if isinstance(call, str):
        row.update(batch=batch, status=call)
        return row
    try:
        # warm-up calls that also size the batch: a small probe, then up to two steps towards about
        # call_budget_s per call (small batches overstate the per-sample cost, hence the second step)
        seconds, result = measure.time_call(call, target.device)
        size = calls
        for _ in range(2 if size < batch else 0):
            grown = min(batch, int(size * grid.call_budget_s / max(seconds, 1e-9)))
            if grown <= size * 1.25:
                break
            size = grown
            call = build_call(target, method, phase, work, size, tol)
            seconds, result = measure.time_call(call, target.device)
        batch = size
        if seconds > grid.max_call_s:  # measured once; larger sizes of this target are skipped
            state.too_slow.setdefault(key, (nnz, seconds))
        for _ in range(grid.warmup - 1):
            if seconds * grid.warmup > grid.measure_budget_s:
                break
            seconds, result = measure.time_call(call, target.device)
        repeats = max(1, min(grid.repeats, int(grid.measure_budget_s / max(seconds, 1e-9))))
        result = None
        timing, result = measure.repeat(call, target.device, repeats)
        peak = measure.peak_memory(call, target.device)
        rss = measure.rss_growth(call) if target.device.type == "cpu" else None
    except Exception as err:  # a backend that fails on a size is a result, not a crash of the run
        row.update(batch=batch, status=f"error: {type(err).__name__}: {str(err)[:160]}")
        return row

    state.cost.setdefault(key, []).append((nnz, timing.median / batch))
    itemsize = work.outputs[0].element_size()
    traffic = batch * (nnz + work.num_classes) * itemsize  # read the outputs, write the soft labels
    row.update(
        batch=batch,
        repeats=len(timing.times),
        median_s=timing.median,
        q25_s=timing.q25,
        q75_s=timing.q75,
        min_s=min(timing.times),
        max_s=max(timing.times),
        samples_per_s=batch / timing.median,
        spread_pct=100 * (timing.q75 - timing.q25) / timing.median,
        gbytes_per_s=traffic / timing.median / 1e9,
        peak_mem_bytes=peak,
        rss_growth_bytes=rss,
        status="ok" if len(timing.times) >= 3 else f"ok ({len(timing.times)} repeat(s): slow)",
    )
    if phase == "estimate":  # (soft, info): the diagnostics carry iterations and residuals
        info = result[1]
        solution = SimpleNamespace(**info) if "iterations" in info else None
    else:
        solution = result
    row.update(result_fields(method, solution, tol))
    answer = result[0] if phase == "estimate" else (result if method == "loss" else result.soft)
    answer = torch.as_tensor(answer).detach().to("cpu", torch.float64)
    ref_key = (target.device.type, work.family, work.num_classes, work.num_teachers, method, phase)
    if target.name == "torch" and ref_key not in state.reference:
        state.reference[ref_key] = answer
    reference = state.reference.get(ref_key)
    if reference is not None:
        rows = min(len(reference), len(answer))
        row["max_abs_diff_vs_torch"] = float((answer[:rows] - reference[:rows]).abs().max())
    return row


# ---------------------------------------------------------------------- peers
def measure_peers(
    work: workloads.Workload, grid: Grid, state: State, tol: float, choix_solver: str, which: tuple[str, ...]
) -> list[dict]:
    """scipy and choix on the first few samples of the `ce` problem, one at a time, on the CPU."""
    rows_needed = min(grid.peer_samples, work.batch)
    problem = work.packed("ce", torch.float64, rows=rows_needed)
    values = problem.values.detach().to("cpu", torch.float64).numpy()
    weights = problem.weights.detach().to("cpu", torch.float64).numpy()
    layout = peers.PackedLayout.from_class_sets(problem.teachers.class_sets, work.num_classes)
    key = (work.family, work.num_classes, work.num_teachers, "ce", "solve")
    reference = state.reference.get(("cpu", *key))
    if reference is None:
        reference = state.reference.get(("cuda", *key))
    rows = []
    for peer in which:
        row = {"method": "ce", "backend": peer, "device": "cpu", "phase": "solve", "tol": tol}
        if peer == "choix":
            row["backend"] = f"choix-{choix_solver}"
            if work.num_classes > CHOIX_MAX_CLASSES and choix_solver in ("ilsr", "lsr"):
                rows.append(
                    {
                        **row,
                        "batch": 0,
                        "status": f"skipped: choix {choix_solver} factors a dense "
                        f"{work.num_classes}x{work.num_classes} matrix",
                    }
                )
                continue
            if grid.choix_scale * work.nnz > grid.choix_max_work:
                rows.append(
                    {
                        **row,
                        "batch": 0,
                        "status": f"skipped: ~{grid.choix_scale * work.nnz:.0e} Python "
                        "steps per iteration (counts repeated as records)",
                    }
                )
                continue
        try:
            import scipy  # noqa: F401

            if peer == "choix":
                import choix  # noqa: F401
        except ImportError as err:
            rows.append({**row, "batch": 0, "status": f"skipped: {err}"})
            continue

        def solve(b: int, peer: str = peer):
            if peer == "scipy":
                return lambda: peers.scipy_ce(values[b], weights, layout, tol=tol)
            data = peers.choix_data(values[b], weights, layout, grid.choix_scale)  # conversion: not timed
            return lambda: peers.choix_ce(data, work.num_classes, solver=choix_solver)

        times, answers, iters, converged = [], [], [], []
        # one thread: a per-sample loop parallelises across samples (processes), not inside one
        with measure.limit_threads(1) or contextlib.nullcontext():
            if peer == "scipy":
                solve(0)()  # warm-up (scipy's first call initialises its machinery)
            start = time.perf_counter()
            for b in range(len(values)):
                if b and time.perf_counter() - start > grid.peer_budget_s:
                    break
                seconds, out = measure.time_call(solve(b), torch.device("cpu"))
                times.append(seconds)
                answers.append(out.q)
                iters.append(out.iterations)
                converged.append(out.converged)
            peak = measure.python_peak(solve(0)) if peer == "scipy" or times[0] < grid.peer_budget_s else None
        timing = measure.Timing(tuple(times))
        residual = np.array(
            [
                peers.kkt_residual(q, values[b], weights, layout) if np.isfinite(q).all() else np.inf
                for b, q in enumerate(answers)
            ]
        )
        row.update(
            batch=len(times),
            repeats=len(times),
            median_s=timing.median,
            q25_s=timing.q25,
            q75_s=timing.q75,
            min_s=min(times),
            max_s=max(times),
            samples_per_s=1.0 / timing.median,  # per-sample loop: one sample per call
            spread_pct=100 * (timing.q75 - timing.q25) / timing.median,
            peak_mem_bytes=peak,
            residual_median=float(np.median(residual)),
            residual_max=float(residual.max()),
            converged_frac=float(np.mean(residual <= tol)),
            status="ok" if all(converged) else f"ok ({len(converged) - sum(converged)} not converged by the peer)",
        )
        if min(iters) >= 0:
            row.update(iters_mean=float(np.mean(iters)), iters_max=int(max(iters)))
        if peer == "choix":
            row["status"] += f"; counts = round({grid.choix_scale:g} p)"
        if reference is not None:
            ours = reference[: len(answers)].numpy()
            row["max_abs_diff_vs_torch"] = float(np.abs(np.stack(answers) - ours).max())
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- ratios
def add_ratios(rows: list[dict]) -> None:
    """``x_torch``: samples/s over the torch reference's (same problem, method, phase and device; the
    peers against torch on the CPU). ``x_scipy`` / ``x_choix``: `ce` rows over the peer's per-sample rate.
    ``estimate_over_solve``: on estimate rows, the cost of ``estimate`` over the same backend's solve."""
    torch_speed, peer_speed, solve_speed = {}, {}, {}
    for r in rows:
        if not r.get("samples_per_s"):
            continue
        point = (r["family"], r["K"], r["N"], r["sweep_batch"])
        if r["backend"] == "torch":
            torch_speed[(*point, r["method"], r["device"], r["phase"])] = r["samples_per_s"]
        if r["backend"] in PEERS:
            peer_speed[(r["family"], r["K"], r["N"], PEERS[r["backend"]])] = r["samples_per_s"]
        elif r["phase"] == "solve":
            solve_speed[(*point, r["method"], r["backend"], r["device"])] = r["samples_per_s"]
    for r in rows:
        speed = r.get("samples_per_s")
        if not speed:
            continue
        point = (r["family"], r["K"], r["N"], r["sweep_batch"])
        if r["backend"] in PEERS:
            base = torch_speed.get((*point, "ce", "cpu", "solve"))
        else:
            base = torch_speed.get((*point, r["method"], r["device"], r["phase"]))
        if base:
            r["x_torch"] = speed / base
        if r["phase"] == "estimate":
            solve = solve_speed.get((*point, r["method"], r["backend"], r["device"]))
            if solve:
                r["estimate_over_solve"] = solve / speed
        if r["method"] == "ce" and r["sweep_batch"] is None and r["backend"] not in PEERS:
            for peer in ("scipy", "choix"):
                if (r["family"], r["K"], r["N"], peer) in peer_speed:
                    r[f"x_{peer}"] = speed / peer_speed[(r["family"], r["K"], r["N"], peer)]


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small grid (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="the whole grid")
    parser.set_defaults(mode="quick")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKEND_NAMES[1:],
        default=None,
        help="default: every available backend",
    )
    parser.add_argument(
        "--devices", nargs="+", choices=("cpu", "cuda"), default=None, help="default: cpu, and cuda when present"
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--phases", nargs="+", choices=("solve", "estimate"), default=None)
    parser.add_argument(
        "--families",
        nargs="+",
        choices=workloads.FAMILIES,
        default=None,
        help="workload families to run (default: all; the sweeps are the subsets family)",
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        choices=("scipy", "choix"),
        default=["scipy", "choix"],
        help="peers for `ce` (none: --peers with no value)",
    )
    parser.add_argument("--choix-solver", choices=peers.CHOIX_SOLVERS, default="ilsr")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch, OpenMP and BLAS (default: the usable cores; use 1 on a busy machine)",
    )
    parser.add_argument("--no-b-sweep", action="store_true", help="skip the batch-size sweep")
    parser.add_argument("--allow-interpret", action="store_true", help="also time Triton's CPU interpreter")
    parser.add_argument(
        "--native",
        type=Path,
        default=None,
        help="load uhc_fast._native_cpu from this file (a copy: the in-place build may be replaced during a run)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    parser.add_argument("--tag", default=None, help="file name stem (default: the mode)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--update-readme", action="store_true", help="write the Markdown table into benchmarks/README.md"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.native is not None:
        from .bench_native import use_native

        use_native(args.native)
    threads = args.threads or machine.usable_cores()
    torch.set_num_threads(threads)
    with contextlib.suppress(ImportError):  # load scipy's own BLAS now, so that the cap below reaches it
        import scipy.optimize  # noqa: F401
    measure.limit_threads(threads)  # BLAS/OpenMP pools of numpy and scipy too
    grid = GRIDS[args.mode]
    if args.phases:
        grid = replace(grid, phases=tuple(args.phases))
    if args.no_b_sweep:
        grid = replace(grid, bs=())
    dtype = DTYPES[args.dtype]
    tol = default_tol(dtype)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    targets, notes = discover(args.backends, devices, args.allow_interpret)
    stamp = machine.describe()
    bandwidth = {
        d: measure.copy_bandwidth(torch.device(d)) for d in devices if d != "cuda" or torch.cuda.is_available()
    }
    print(f"uhc_fast benchmarks ({grid.name}) on {machine.machine_line(stamp)}; commit {stamp['commit']}", flush=True)
    print("targets: " + ", ".join(t.label for t in targets) + ("; " + "; ".join(notes) if notes else ""), flush=True)

    state = State()
    rows: list[dict] = []
    started = time.perf_counter()
    for family, k, n, fixed in grid.points():
        if args.families and family not in args.families:
            continue
        sets = workloads.class_sets(family, k, n)
        structure = {
            key: value
            for key, value in workloads.stats(uhc_fast.TeacherSet(sets, num_classes=k)).items()
            if key not in ("N", "K")
        }
        for device in sorted({t.device.type for t in targets}):
            on_device = [t for t in targets if t.device.type == device]
            batch = fixed or workloads.steady_batch(
                structure["nnz"], grid.target_elements[device], grid.min_batch, grid.max_batch[device]
            )
            work = workloads.make(max(batch, grid.peer_samples), k, n, family=family, dtype=dtype, device=device)
            methods = [m for m in args.methods if fixed is None or m in grid.b_sweep_methods]
            for method in methods:
                for phase in grid.phases:
                    for target in on_device:
                        row = measure_one(target, method, phase, work, batch, fixed is not None, grid, state, tol)
                        row.update(family=family, K=k, N=n, sweep_batch=fixed, dtype=args.dtype, **structure)
                        rows.append(row)
                        _print_row(row)
            if device == "cpu" or "cpu" not in devices:
                if fixed is None and "ce" in args.methods and args.peers:
                    cpu_work = work
                    if device != "cpu":
                        cpu_work = workloads.make(grid.peer_samples, k, n, family=family, dtype=dtype)
                    for row in measure_peers(cpu_work, grid, state, tol, args.choix_solver, tuple(args.peers)):
                        row.update(family=family, K=k, N=n, sweep_batch=None, dtype="float64", **structure)
                        rows.append(row)
                        _print_row(row)
    add_ratios(rows)
    elapsed = time.perf_counter() - started
    stamp["load_end"] = machine.load_average()
    for row in rows:
        row["mode"] = grid.name
        row.update(stamp)
        if row.get("gbytes_per_s") and row["device"] in bandwidth:
            row["pct_copy_bw"] = 100 * row["gbytes_per_s"] / bandwidth[row["device"]]
    stem = args.tag or grid.name
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = report.write_csv(rows, args.out / f"{stem}.csv")
    context = report.Context(
        stamp=stamp,
        grid=grid,
        notes=notes,
        bandwidth=bandwidth,
        elapsed_s=elapsed,
        dtype=args.dtype,
        tol=tol,
        command=" ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
    )
    plots = []
    if not args.no_plots:
        plots = report.plots(rows, context, args.out, stem)
    md = report.markdown(rows, context, [p.name for p in plots])
    md_path = args.out / f"{stem}.md"
    md_path.write_text(md)
    if args.update_readme:
        report.update_readme(Path(__file__).resolve().parent / "README.md", md, f"results/{stem}.md")
    print(f"wrote {csv_path}, {md_path}" + "".join(f", {p}" for p in plots) + f" in {elapsed:.0f} s")
    return 0


def _print_row(row: dict) -> None:
    speed = row.get("samples_per_s")
    extra = ""
    if row.get("iters_mean") is not None:
        extra = f" iters {row['iters_mean']:.1f}/{row['iters_max']} res {row['residual_max']:.1e}"
    text = f"{speed:12.4g} samples/s" if speed else f"{'-':>12} {row['status']}"
    print(
        f"  {row['family']:<8} K={row['K']:<6} N={row['N']:<4} G={row['G']:<6} B={row.get('batch', '-')!s:<6} "
        f"{row['method']:<6} {row['phase']:<8} {row['backend'] + '/' + row['device']:<16} {text}{extra}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
