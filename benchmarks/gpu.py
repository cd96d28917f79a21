"""The GPU check: build, test, verify and measure both GPU backends in one command.

    python -m benchmarks.gpu              # on a GPU machine: everything below, within ~8 minutes
    python -m benchmarks.gpu --out $OUT   # on a lent machine: the results into the folder that returns
    python -m benchmarks.gpu --quick      # the same, smaller (one shape, fewer timings)
    python -m benchmarks.gpu --aot --json # anywhere: compile every kernel for sm_90, ptxas statistics

**Without a GPU** (no ``--aot``) it says so and exits 0.

**``--aot``** (no GPU needed; CI runs it): every Triton kernel variant the production shapes run is
compiled ahead of time for ``sm_90`` (Triton's full pipeline, then ptxas ``-v``), and the CUDA
extension's kernels are compiled by ``nvcc -arch=sm_90 --ptxas-options=-v`` (``--cuda-from-module``:
read from the built module with ``cuobjdump -res-usage`` instead, which has no spill counts). One
record per kernel and shape: registers, spill bytes (stores + loads), stack bytes, shared memory,
the launch options. A Triton variant depends on the number of teachers and the dtypes only (K and
B are runtime values), and the CUDA extension has one kernel per answer dtype for every shape, so
shapes that share a variant share its statistics. The per-sample top-k kernel (``kernels/topk.py``)
is compiled at its own shapes (:data:`TOPK_SHAPES`). Exit status 1 when anything failed to compile or
anything spills at K=1000, N=20.

**On a GPU** (fresh H100/H200, torch and triton installed, no package registry), in the order that
keeps the most valuable results when a lease runs out (every step writes into ``--out`` as it ends):

1. build: ``pip install --no-build-isolation --no-deps -e .`` with ``UHC_FAST_CUDA=1`` and
   ``UHC_FAST_CUDA_ARCHS=90`` (``--skip-build`` to keep the current build);
2. the gate shape (K=1000, N=20, float16): every method on both GPU backends (``--backends``), the
   streaming methods (sd, ce, mf-lf) at B = 2^20 as the targets are stated, mf-p and mf-lu at
   B = 65536, against the ``cpu`` backend on a subset of the rows, with assertions: closed forms
   (sd, mf-lf) within 256 float32 ulps; iterative methods within 1e-4 (ce) / 1e-3 (mf-p, mf-lu,
   non-convex) on the rows both report converged, and at least 90% of rows converged;
3. ``pytest -m gpu`` (``--skip-tests``): in parallel processes where pytest-xdist is installed
   (the Triton JIT compiles then overlap), one line per test into ``gpu-tests.log``, so that a run
   stopped at its time limit still says which tests passed and failed;
4. ``ncu`` (``--skip-profile``): each kernel at the gate shape once, its speed of light, occupancy,
   warp stalls and hottest source lines (the CUDA module carries ``-lineinfo``), into
   ``ncu-<device>.txt``;
5. the other production shapes at B = 65536 (so that the persistent / grid-stride loops run many
   rounds);
6. throughput of each backend on the full batch, and of the torch reference on the same GPU (timed
   on ``--reference-rows`` rows, scaled linearly), as samples/s, as a fraction of the HBM roofline,
   of the copy rate (the same bytes read and written by torch's own kernels in the same run) and of
   the model below, in ``gpu-<device>.csv`` and ``.md``.

Exit status 1 when a build step, a test or an assertion failed.

The model: what each kernel must move and compute
=================================================

Per sample, with K classes, N teachers, ``nnz`` packed teacher outputs (``b`` bytes each), ``G``
groups (classes covered by the same teachers), ``E`` (group, teacher) entries, ``P`` (teacher pair,
shared group) entries, ``Pc`` (teacher pair, shared class) entries, and ``it`` Newton steps and
``tr`` line-search trials per step (measured):

==========  ===========================  =====================================================
method      bytes (HBM, compulsory)      float64 flops
==========  ===========================  =====================================================
sd          nnz b + 4 K                  2 nnz
mf-lf       nnz b + 4 K                  8 nnz + 2 N^2 + 25 K
ce          nnz b + 4 K + 16             4 nnz + 3 K + it (12 E + 55 G + P + N^3/3 + tr (2 E + 22 G))
mf-p        nnz b + 4 K + 16             ce + it (24 nnz + 8 Pc + N^3/3 + tr 8 nnz)
mf-lu       nnz b + 4 K + 16             it ((1 + tr)(15 nnz + 4 Pc + N^3/3) + 24 nnz + 14 Pc + 3 N^3)
==========  ===========================  =====================================================

(exp, log, expm1 and log1p count 20 flops each; every Newton system is float64.)
The expected time is ``max(bytes / HBM bandwidth, flops / FP64 rate)``. On an H200 (4.8 TB/s, 34
TFLOP/s FP64 without tensor cores), per million samples of float16 inputs, with it = 5 (ce) or 8
(mf-p, mf-lu) steps and tr = 1 trial per step, at the structure of this script's shapes:

=========  ===========================================  ==========================================
method     K=1000, N=20 (nnz 5021, G 964, E 4951,       K=20000, N=8 windows (nnz 40000, G 8,
           P 12109, Pc 12159): 14.0 GB                  E 16, P 8, Pc 20000): 160 GB
=========  ===========================================  ==========================================
sd         2.9 ms memory, 0.3 ms compute: memory-bound  33 ms memory, 2.4 ms compute: memory-bound
mf-lf      2.9 ms memory, 1.9 ms compute: memory-bound  33 ms memory, 24 ms compute: memory-bound
ce         2.9 ms memory, 24 ms compute                 33 ms memory, 6.6 ms compute: memory-bound
mf-p       2.9 ms memory, 99 ms compute                 33 ms memory, 346 ms compute
mf-lu      2.9 ms memory, 134 ms compute                33 ms memory, 612 ms compute
=========  ===========================================  ==========================================

At K=1000, N=64 (nnz 16045, P 126977): 36 GB, 7.5 ms memory; ce 78 ms compute, mf-p 504 ms.

The report prints the same model for the shapes it measured, from their actual structure counts
and iteration counts, next to the measured time ("of model" = model time / measured time).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
METHODS = ("sd", "ce", "mf-p", "mf-lf", "mf-lu")
ITERATIVE = ("ce", "mf-p", "mf-lu")
# peak HBM bandwidth (bytes/s) and FP64 rate (flop/s) by device name; others: from the clocks if
# NVML is there, else unknown
PEAKS = {
    "H200": (4.8e12, 34e12),
    "H100 SXM": (3.35e12, 34e12),
    "H100 NVL": (3.9e12, 30e12),
    "H100 PCIe": (2.0e12, 26e12),
    "H100": (3.35e12, 34e12),
    "A100": (2.0e12, 9.7e12),
}
NO_GPU = (
    "benchmarks.gpu: no CUDA device here, nothing to build or measure "
    "(python -m benchmarks.gpu --aot compiles the kernels for sm_90 without one)"
)


@dataclass(frozen=True)
class Shape:
    """One production shape: K classes, N teachers, how the class sets are drawn, the input dtype."""

    name: str
    classes: int
    teachers: int
    sets: str  # "subsets" (each teacher ~coverage of the classes) or "windows" (~2 teachers per class)
    coverage: float
    dtype: str  # the teachers' outputs: "float16" or "float32"

    @property
    def label(self) -> str:
        return f"K={self.classes},N={self.teachers}"


SHAPES = (
    Shape("K=1000,N=20 float16", 1000, 20, "subsets", 0.25, "float16"),
    Shape("K=1000,N=20 float32", 1000, 20, "subsets", 0.25, "float32"),
    Shape("K=20000,N=8 float16", 20000, 8, "windows", 2.0, "float16"),
    Shape("K=1000,N=64 float16", 1000, 64, "subsets", 0.25, "float16"),
)
GATE = "K=1000,N=20"  # nothing may spill at this shape


# ============================================================================================ AOT
def _compile_task(job: tuple) -> list[dict]:
    """(worker) Compile one Triton variant; returns its record as a dict."""
    num_teachers, dtype_name, method, index = job
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    from uhc_fast.kernels import aot

    dtype = getattr(torch, dtype_name)
    kernel, meth, consts, options = aot.variants(num_teachers, dtype, (method,))[index]
    record = aot.compile_variant(kernel, meth, consts, options, dtype, 90, "")
    return [record.as_dict()]


# the per-sample top-k kernel (kernels/topk.py) at its own shapes: teachers, slots (sum of k), dtype, method
TOPK_SHAPES = ((4, 256, "float32", "ce"), (8, 512, "float16", "ce"), (8, 512, "float64", "sd"))


def _topk_task(job: tuple) -> list[dict]:
    """(worker) Compile the top-k kernel at one of :data:`TOPK_SHAPES`; returns its record."""
    teachers, slots, dtype_name, method = job
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    from uhc_fast.kernels import topk

    record = {
        "backend": "triton",
        "kernel": "_topk_kernel",
        "method": f"topk-{method}",
        "shape": f"topk N={teachers},slots={slots} {dtype_name}",
        "gate": False,
        "input_dtype": dtype_name,
        "error": None,
    }
    start = time.perf_counter()
    try:
        code = topk.CE if method == "ce" else topk.SD
        stats = topk.compile_check(teachers, slots, getattr(torch, dtype_name), code)
        record.update(
            registers=stats["registers"],
            spill_bytes=stats["spill_stores"] + stats["spill_loads"],
            stack_bytes=stats["stack_bytes"],
            shared_bytes=stats.get("smem", 0),
        )
    except Exception as err:  # reported per record
        record.update(registers=None, spill_bytes=None, stack_bytes=None, shared_bytes=None)
        record["error"] = f"{type(err).__name__}: {err}"[-2000:]
    record["compile_seconds"] = round(time.perf_counter() - start, 2)
    return [record]


def triton_records(shapes, methods, workers: int) -> list[dict]:
    """Every Triton variant of ``shapes``: compiled once each, one record per shape."""
    import torch
    from uhc_fast.kernels import aot

    jobs, owners = {}, {}
    for shape in shapes:
        dtype = getattr(torch, shape.dtype)
        for method in (m for m in methods if m != "topk"):
            for index, (kernel, _m, consts, options) in enumerate(aot.variants(shape.teachers, dtype, (method,))):
                key = (kernel.__name__, tuple(sorted((k, str(v)) for k, v in consts.items())), str(options))
                jobs.setdefault(key, (shape.teachers, shape.dtype, method, index))
                owners.setdefault(key, []).append(shape)
    done: dict = {}
    topk_jobs = TOPK_SHAPES if "topk" in methods else ()
    # fresh processes: the compiler must not see this one's TRITON_INTERPRET (tests run under it)
    with futures.ProcessPoolExecutor(max(1, workers), mp_context=_spawn()) as pool:
        topk_results = [pool.submit(_topk_task, job) for job in topk_jobs]
        for key, result in zip(jobs, pool.map(_compile_task, jobs.values())):
            done[key] = result[0]
        extra = [r for future in topk_results for r in future.result()]
    records = []
    for key, shapes_of in owners.items():
        for shape in shapes_of:
            records.append({**done[key], "backend": "triton", "shape": shape.name, "gate": shape.label == GATE})
    return records + extra


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


_FUNC = re.compile(r"Function properties for (\S+)")
_CUDA_STATS = {
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
    "shared_bytes": re.compile(r"(\d+) bytes smem"),
}


def nvcc_stats(capability: int = 90) -> dict[str, dict]:
    """ptxas statistics of csrc/cuda/kernels.cu's kernels (by mangled name) from nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"uhc_fast_kernels_{os.getpid()}.o"
    cmd = [nvcc, f"-arch=sm_{capability}", "--ptxas-options=-v", "-O3", "-std=c++17", f"-I{REPO / 'csrc'}"]
    cmd += ["-c", str(REPO / "csrc" / "cuda" / "kernels.cu"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    out.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed: {done.stderr[-3000:]}")
    return parse_ptxas(done.stderr + done.stdout)


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per kernel of a ``ptxas -v`` log: registers, stack, spill stores and loads, shared memory."""
    stats: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        found = _FUNC.search(line) or re.search(r"Compiling entry function '(\S+)'", line)
        if found:
            current = found.group(1)
            stats.setdefault(current, {})
            continue
        if current is None:
            continue
        for key, pattern in _CUDA_STATS.items():
            m = pattern.search(line)
            if m:
                stats[current][key] = int(m.group(1))
    return stats


def cuobjdump_stats() -> dict[str, dict]:
    """Registers, stack and shared memory of the built CUDA module's kernels (no spill counts)."""
    module = next(iter((REPO / "uhc_fast").glob("_native_cuda*.so")), None)
    if module is None:
        raise RuntimeError("uhc_fast/_native_cuda*.so is not built")
    tool = shutil.which("cuobjdump")
    if tool is None:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        tool = str(bundled) if bundled.exists() else None
    if tool is None:
        raise RuntimeError("cuobjdump not found")
    log = subprocess.run([tool, "-res-usage", str(module)], capture_output=True, text=True, check=True).stdout
    stats, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", line)
        if m and current:
            stats[current] = {"registers": int(m[1]), "stack_bytes": int(m[2]), "shared_bytes": int(m[3])}
    return stats


CUDA_METHOD_CODES = {"sd": 0, "ce": 1, "mf-p": 2, "mf-lf": 3, "mf-lu": 4}  # csrc/core/constants.h


def cuda_records(shapes, source: str) -> list[dict]:
    """The CUDA extension's kernels, one record per method and shape: ``team_kernel<M, float>`` (sd,
    mf-lf: a warp per sample; ce: a block) or ``solve_kernel<M, float>`` (a thread per sample) serves float16 and
    float32 inputs, ``<M, double>`` float64. A kernel missing from the statistics is an error, not a
    silent pass."""
    try:
        stats = nvcc_stats() if source == "nvcc" else cuobjdump_stats()
        error = None
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        stats, error = {}, f"{type(err).__name__}: {err}"
    from uhc_fast.backends.native_launch import load_module

    by_teams = load_module("cpu").team_shapes
    records = []
    for shape in shapes:
        out = "double" if shape.dtype == "float64" else "float"
        for method, code in CUDA_METHOD_CODES.items():
            kernel = "team_kernel" if code in by_teams else "solve_kernel"
            mangled = f"{kernel}ILi{code}E{out[0]}E"
            name = next((n for n in stats if mangled in n), None)
            s = stats.get(name, {}) if name else {}
            spills = None if source != "nvcc" or not s else s.get("spill_stores", 0) + s.get("spill_loads", 0)
            records.append(
                {
                    "backend": "cuda",
                    "kernel": f"{kernel}<{method},{out}>",
                    "method": method,
                    "shape": shape.name,
                    "gate": shape.label == GATE,
                    "input_dtype": shape.dtype,
                    "answer_dtype": "float64" if out == "double" else "float32",
                    "registers": s.get("registers"),
                    "spill_bytes": spills,
                    "stack_bytes": s.get("stack_bytes"),
                    "shared_bytes": s.get("shared_bytes", 0) if s else None,
                    "source": source,
                    "error": (error or f"no statistics for {mangled}") if not s else None,
                }
            )
    return records


def aot_main(args) -> int:
    """``--aot``: compile, print one record per kernel and shape, exit 1 on errors or gate spills."""
    shapes = select_shapes(args.shapes)
    methods = tuple(args.methods.split(",")) if args.methods else (*METHODS, "loss", "topk")
    start = time.perf_counter()
    cuda_job = None
    if not args.no_cuda:
        pool = futures.ThreadPoolExecutor(1)
        cuda_job = pool.submit(cuda_records, shapes, "module" if args.cuda_from_module else "nvcc")
    records = triton_records(shapes, methods, args.workers)
    if cuda_job is not None:
        records += cuda_job.result()
    failures = [r for r in records if r.get("error")]
    spilled = [r for r in records if r.get("gate") and (r.get("spill_bytes") or 0) > 0]
    if args.json:
        for r in records:
            print(json.dumps(r, default=str))
    else:
        print(f"{'backend':7s} {'kernel':24s} {'method':6s} {'shape':22s} regs spills stack shared")
        for r in records:
            print(
                f"{r['backend']:7s} {str(r['kernel'])[:24]:24s} {r['method']:6s} {r['shape']:22s} "
                f"{r.get('registers')!s:>4} {r.get('spill_bytes')!s:>6} {r.get('stack_bytes')!s:>5} "
                f"{r.get('shared_bytes')!s:>6} {('ERROR ' + r['error'][:200]) if r.get('error') else ''}"
            )
    summary = {
        "summary": True,
        "records": len(records),
        "errors": len(failures),
        "gate_spills": [f"{r['backend']}:{r['kernel']}@{r['shape']}" for r in spilled],
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary) if args.json else f"# {summary}", file=sys.stderr if args.json else sys.stdout)
    return 1 if failures or spilled else 0


def select_shapes(spec: str | None) -> tuple[Shape, ...]:
    """``--shapes``: names or labels of :data:`SHAPES` (separated by ``;``), or ``N=<n>:<dtype>``
    for an ad-hoc shape (K=1000); default all of them."""
    if not spec:
        return SHAPES
    out = []
    for item in spec.split(";"):
        item = item.strip()
        match = [s for s in SHAPES if item in (s.name, s.label)]
        if match:
            out += match
            continue
        m = re.fullmatch(r"N=(\d+):(float16|float32|float64)", item)
        if not m:
            raise SystemExit(f"--shapes: unknown shape {item!r}")
        out.append(Shape(f"K=1000,N={m[1]} {m[2]}", 1000, int(m[1]), "subsets", 0.25, m[2]))
    return tuple(out)


# ============================================================================================ GPU
def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO) -> tuple[int, str, float]:
    """Run a command; ``(returncode, output tail, seconds)``, 124 on timeout."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, (done.stdout + done.stderr)[-6000:], time.perf_counter() - start
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") + (err.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        return 124, text[-6000:], time.perf_counter() - start


def run_into(cmd: list[str], timeout: float, log: Path) -> tuple[int, float]:
    """Run a command (without TRITON_INTERPRET) with its output going into ``log`` as it comes, so a
    command stopped at its time limit leaves what it printed; ``(returncode or 124, seconds)``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def build(timeout: float) -> dict:
    """``pip install --no-build-isolation --no-deps -e .`` for sm_90 with the CUDA backend forced on."""
    env = {**os.environ, "UHC_FAST_CUDA": "1", "UHC_FAST_CUDA_ARCHS": "90"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(REPO)]
    code, tail, seconds = run(cmd, timeout, env)
    return {"step": "build", "ok": code == 0, "seconds": round(seconds, 1), "detail": "" if code == 0 else tail}


_TEST_LINE = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_TEST_ID = re.compile(r"(tests/\S+::\S+)")


def parse_test_log(text: str) -> dict[str, str]:
    """Test id -> outcome from ``pytest -v`` lines, with or without pytest-xdist's worker prefix."""
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        test, outcome = _TEST_ID.search(line), _TEST_LINE.search(line)
        if test and outcome:
            outcomes[test.group(1)] = outcome.group(1)
    return outcomes


def gpu_tests(timeout: float, out: Path) -> dict:
    """``pytest -m gpu`` in a subprocess (``-n`` workers with pytest-xdist, a per-test time limit
    with pytest-timeout), one line per test into ``out/gpu-tests.log`` as it goes."""
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "--tb=short", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "150"]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu-tests.log"
    code, seconds = run_into(cmd, timeout, log)
    outcomes = parse_test_log(log.read_text(errors="replace"))
    counts = {k: sum(v == k for v in outcomes.values()) for k in sorted(set(outcomes.values()))}
    failed = sorted(t for t, v in outcomes.items() if v in ("FAILED", "ERROR"))
    detail = ", ".join(f"{n} {k.lower()}" for k, n in counts.items())
    if code == 124:
        detail += f"; stopped after {timeout:.0f} s"
    if failed:
        detail += "; failed: " + " ".join(failed[:30])
    return {
        "step": "pytest -m gpu",
        "ok": code in (0, 5) and not failed,  # 5: nothing collected
        "seconds": round(seconds, 1),
        "detail": detail + f" (log: {log.name})",
    }


def class_sets(shape: Shape, seed: int = 0) -> list[list[int]]:
    """The shape's class sets: random subsets (every class covered, teachers chained) or windows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k, n = shape.classes, shape.teachers
    if shape.sets == "windows":
        order = rng.permutation(k)
        starts = [(i * k) // n for i in range(n)]
        sets = []
        for i, start in enumerate(starts):
            gap = (starts[i + 1] if i + 1 < n else k) - start
            size = min(k, max(2, gap + 1, math.ceil(shape.coverage * k / n)))
            sets.append(sorted({int(order[(start + j) % k]) for j in range(size)}))
        return sets
    size = max(2, round(shape.coverage * k))
    sets = [set(rng.choice(k, size=size, replace=False).tolist()) for _ in range(n)]
    for c in set(range(k)) - set().union(*sets):
        sets[int(rng.integers(n))].add(c)
    for i in range(1, n):
        sets[i].add(int(rng.choice(sorted(sets[i - 1]))))
    return [sorted(s) for s in sets]


def make_inputs(shape: Shape, batch: int, kind: str, seed: int = 0, device: str = "cuda"):
    """Teacher outputs on ``device``: ``q = softmax(2 g)`` restricted to each teacher, log-normal
    noise (0.3), as probabilities (or their logs, for the logit methods), in the shape's dtype."""
    import torch

    sets = class_sets(shape, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    outputs = [torch.empty(batch, len(s), dtype=dtype, device=device) for s in sets]
    chunk = max(1, (1 << 26) // max(1, shape.classes))
    for lo in range(0, batch, chunk):
        hi = min(batch, lo + chunk)
        truth = 2.0 * torch.randn(hi - lo, shape.classes, device=device, generator=gen)
        for i, s in enumerate(sets):
            z = truth[:, s] + 0.3 * torch.randn(hi - lo, len(s), device=device, generator=gen)
            outputs[i][lo:hi] = (
                torch.log_softmax(z, dim=1).to(dtype) if kind == "logits" else torch.softmax(z, 1).to(dtype)
            )
    return sets, outputs


def structure_counts(teachers) -> dict:
    """nnz, G, E, P and Pc of a TeacherSet (the model's inputs)."""
    import numpy as np

    mask = teachers.mask.numpy()
    sets = np.unique(mask.T, axis=0)
    degree = sets.sum(axis=1)
    per_class = mask.sum(axis=0)
    return {
        "nnz": int(mask.sum()),
        "G": int(sets.shape[0]),
        "E": int(degree.sum()),
        "P": int((degree * (degree - 1) // 2).sum()),
        "Pc": int((per_class * (per_class - 1) // 2).sum()),
    }


def model(method: str, shape: Shape, counts: dict, iterations: float, trials: float = 1.0) -> tuple[float, float]:
    """``(bytes, float64 flops)`` per sample of the table in the module docstring."""
    k, n = shape.classes, shape.teachers
    nnz, g, e, p, pc = (counts[key] for key in ("nnz", "G", "E", "P", "Pc"))
    b = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[shape.dtype]
    moved = nnz * b + 4 * k + (16 if method in ITERATIVE else 0)
    it, tr = iterations, trials
    ce = 4 * nnz + 3 * k + it * (12 * e + 55 * g + p + n**3 / 3 + tr * (2 * e + 22 * g))
    flops = {
        "sd": 2 * nnz,
        "mf-lf": 8 * nnz + 2 * n * n + 25 * k,
        "ce": ce,
        "mf-p": ce + it * (24 * nnz + 8 * pc + n**3 / 3 + tr * 8 * nnz),
        "mf-lu": it * ((1 + tr) * (15 * nnz + 4 * pc + n**3 / 3) + 24 * nnz + 14 * pc + 3 * n**3),
    }[method]
    return float(moved), float(flops)


def peaks(name: str) -> tuple[float, float]:
    """Peak HBM bandwidth and FP64 rate of a device by name (NaN where unknown)."""
    for key, value in PEAKS.items():
        if key in name:
            return value
    return float("nan"), float("nan")


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best of ``repeats`` timed calls after one warm-up (which compiles), synchronised."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    start = time.perf_counter()
    result = fn()
    sync()
    if time.perf_counter() - start > 5:  # a slow kernel: one timed call is enough
        repeats = min(repeats, 1)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def sm_clock() -> float | None:
    """The SM clock (MHz) over NVML's last sample period, right after a timed call: a kernel that
    ran at a low clock explains itself (None without NVML)."""
    import torch

    try:
        return float(torch.cuda.clock_rate())
    except Exception:  # no pynvml, or not a CUDA device
        return None


def copy_time(outputs, classes: int, repeats: int) -> float:
    """Seconds torch's own kernels take to move the bytes the model counts: each input read once
    (a sum), the answers written once (a fill); the copy rate of the same run."""
    import torch

    answers = torch.empty(outputs[0].shape[0], classes, dtype=torch.float32, device=outputs[0].device)
    seconds, _ = timed(lambda: (torch.stack([x.sum() for x in outputs]), answers.fill_(0)), repeats)
    return seconds


def check_shape(
    shape: Shape,
    methods,
    batch: int,
    check_rows: int,
    reference_rows: int,
    repeats: int,
    device: str = "cuda",
    backends: tuple[str, ...] = ("cuda", "triton"),
) -> list[dict]:
    """Every method on ``backends`` at ``shape``: agreement with ``cpu`` on a subset of rows (with
    assertions), and timings against the torch reference. (``device="cpu"`` with the Triton
    interpreter exercises this code without a GPU: tests/test_gpu_tooling.py.)"""
    import torch

    import uhc_fast

    rows = []
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bandwidth, fp64 = peaks(device_name)
    for method in methods:
        kind = "logits" if method in ("mf-lf", "mf-lu") else "probs"
        sets, outputs = make_inputs(shape, batch, kind, device=device)
        teachers = uhc_fast.TeacherSet(sets, num_classes=shape.classes)
        counts = structure_counts(teachers)
        picked = torch.linspace(0, batch - 1, min(batch, check_rows), device=device).round().long().unique()
        cpu_in = [x[picked].cpu() for x in outputs]
        expected, expected_info = uhc_fast.estimate(
            cpu_in, teachers, method, inputs=kind, backend="cpu", return_info=True
        )
        ref_rows = min(batch, reference_rows)
        ref_in = [x[:ref_rows] for x in outputs]
        ref_seconds, ref_out = timed(
            lambda ref_in=ref_in, teachers=teachers, method=method, kind=kind: uhc_fast.estimate(
                ref_in, teachers, method, inputs=kind, backend="torch"
            ),
            1,
        )
        del ref_out
        ref_per_sample = ref_seconds / ref_rows
        copy_seconds = copy_time(outputs, shape.classes, repeats)
        for backend in backends:
            row = {"device": device_name, "shape": shape.name, "method": method, "backend": backend, "batch": batch}
            row.update(counts)
            try:
                seconds, (soft, info) = timed(
                    lambda b=backend, xs=outputs, teachers=teachers, method=method, kind=kind: uhc_fast.estimate(
                        xs, teachers, method, inputs=kind, backend=b, return_info=True
                    ),
                    repeats,
                )
            except Exception as err:
                row.update(ok=False, detail=f"{type(err).__name__}: {err}"[:500])
                rows.append(row)
                continue
            got = soft[picked].cpu().double()
            diff = (got - expected.double()).abs().amax(dim=1)
            finite = bool(torch.isfinite(soft).all())
            row.update(ran_on=info["backend"], seconds=seconds, samples_per_s=batch / seconds, sm_mhz=sm_clock())
            if method in ITERATIVE:
                both = info["converged"][picked].cpu() & expected_info["converged"]
                limit = 1e-4 if method == "ce" else 1e-3
                worst = float(diff[both].max()) if bool(both.any()) else 0.0
                share = float(info["converged"].float().mean())
                iterations = float(info["iterations"].float().mean())
                ok = finite and worst <= limit and share >= 0.9
                row.update(converged=share, iterations=iterations, max_diff_converged=worst, limit=limit)
            else:
                iterations, limit = 0.0, 256 * torch.finfo(torch.float32).eps
                worst = float(diff.max())
                ok = finite and worst <= limit
                row.update(max_diff=worst, limit=limit)
            moved, flops = model(method, shape, counts, iterations)
            model_seconds = batch * max(moved / bandwidth, flops / fp64)
            row.update(
                ok=ok,
                GBps=batch * moved / seconds / 1e9,
                of_hbm_roofline=batch * moved / seconds / bandwidth,
                model_seconds=model_seconds,
                of_model=model_seconds / seconds,
                copy_seconds=copy_seconds,
                of_copy=copy_seconds / seconds,
                torch_seconds_scaled=ref_per_sample * batch,
                speedup_vs_torch=ref_per_sample * batch / seconds,
            )
            rows.append(row)
            print(
                f"  {shape.name:22s} {method:6s} {backend:6s} ran on {row['ran_on']:6s} {seconds:8.4f} s "
                f"{row['samples_per_s']:10.3g}/s {row['of_hbm_roofline']:6.1%} of HBM, {row['of_copy']:6.1%} of copy, "
                f"{row['of_model']:6.1%} of model, "
                f"{row['speedup_vs_torch']:7.1f}x torch, SM at {row['sm_mhz']} MHz  {'ok' if ok else 'FAILED'}",
                flush=True,
            )
        del outputs
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _stem(device: str) -> str:
    """A device name as a file name's part: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()


def write_results(rows: list[dict], steps: list[dict], device: str, out: Path) -> tuple[Path, Path]:
    """``gpu-<device>.csv`` (one row per shape, method and backend) and ``.md``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-" + _stem(device)
    fields = sorted(
        {key for row in rows for key in row}, key=lambda k: (k not in _ORDER, _ORDER.index(k) if k in _ORDER else 0, k)
    )
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# uhc_fast on {device}", "", "| step | ok | seconds | detail |", "|---|---|---|---|"]
    for s in steps:
        detail = s.get("detail", "").splitlines()[0][:120] if s.get("detail") else ""
        lines.append(f"| {s['step']} | {'yes' if s['ok'] else '**no**'} | {s.get('seconds', '')} | {detail} |")
    lines += [
        "",
        "| shape | method | backend | ran on | samples/s | of HBM roofline | of copy | of model | x torch "
        "| agreement | ok |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        agreement = r.get("max_diff_converged", r.get("max_diff", ""))
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['backend']} | {r.get('ran_on', '')} | "
            f"{r.get('samples_per_s', 0):.3g} | "
            f"{r.get('of_hbm_roofline', 0):.1%} | {r.get('of_copy', 0):.1%} | {r.get('of_model', 0):.1%} | "
            f"{r.get('speedup_vs_torch', 0):.1f} | "
            f"{agreement:.2g} | {'yes' if r.get('ok') else '**no**'} |"
            if "seconds" in r
            else f"| {r['shape']} | {r['method']} | {r['backend']} | | | | | | | {r.get('detail', '')} | **no** |"
        )
    lines += ["", "The model (bytes, flops, expected time) is the table in benchmarks/gpu.py's docstring.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    return out / f"{stem}.csv", out / f"{stem}.md"


_ORDER = ["device", "shape", "method", "backend", "ran_on", "batch", "ok", "seconds", "samples_per_s", "GBps"]


STREAMING = ("sd", "ce", "mf-lf")  # the methods whose targets are stated at B = 2^20
# the kernels ncu profiles: the CUDA module's and the Triton solvers (not torch's own small kernels)
PROFILED_KERNELS = "regex:.*(team_kernel|solve_kernel|_(sd|ce|mf_p|mf_lf|mf_lu)_kernel).*"
NCU_SECTIONS = (
    "SpeedOfLight",
    "Occupancy",
    "LaunchStats",
    "MemoryWorkloadAnalysis",
    "WarpStateStats",
    "SourceCounters",
)


def profile_target(methods, backends) -> None:
    """(``--profile-target``, run under ncu) Each method and backend at the gate shape: one call to
    compile, then one between cudaProfilerStart and Stop, the one ncu records."""
    import torch

    import uhc_fast

    shape = next(s for s in SHAPES if s.label == GATE)
    for method in methods:
        kind = "logits" if method in ("mf-lf", "mf-lu") else "probs"
        batch = 65536 if method in STREAMING else 8192
        sets, outputs = make_inputs(shape, batch, kind)
        teachers = uhc_fast.TeacherSet(sets, num_classes=shape.classes)
        for backend in backends:
            uhc_fast.estimate(outputs, teachers, method, inputs=kind, backend=backend)
            torch.cuda.synchronize()
            torch.cuda.profiler.start()  # ncu runs with --profile-from-start off
            uhc_fast.estimate(outputs, teachers, method, inputs=kind, backend=backend)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"profiled {method} on {backend}", flush=True)


def profile(methods, backends, timeout: float, out: Path, device: str) -> dict:
    """ncu over :func:`profile_target`: one report per kernel into ``out/ncu-<device>.txt``."""
    ncu = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        return {"step": "ncu", "ok": False, "detail": "ncu not found"}
    report = out / f"ncu-{_stem(device)}.txt"
    cmd = [str(ncu), "--clock-control", "none", "--profile-from-start", "off", "-k", PROFILED_KERNELS]
    for section in NCU_SECTIONS:
        cmd += ["--section", section]
    cmd += [sys.executable, "-m", "benchmarks.gpu", "--profile-target", "--methods", ",".join(methods)]
    cmd += ["--backends", ",".join(backends)]
    code, seconds = run_into(cmd, timeout, report)
    kernels = report.read_text(errors="replace").count("Section: GPU Speed Of Light Throughput")
    return {
        "step": "ncu",
        "ok": code == 0,
        "seconds": round(seconds, 1),
        "detail": f"{kernels} kernels profiled" + (f"; exit {code}" if code else "") + f" (report: {report.name})",
    }


def gpu_main(args) -> int:
    """The full GPU check (see the module docstring)."""
    out = Path(args.out)
    steps = []
    if not args.skip_build:
        steps.append(build(args.build_timeout))
        print(f"build: {'ok' if steps[-1]['ok'] else 'FAILED'} ({steps[-1]['seconds']} s)", flush=True)
        if not steps[-1]["ok"]:
            print(steps[-1]["detail"])
    import torch

    device = torch.cuda.get_device_name()
    shapes = select_shapes(args.shapes) if args.shapes else (SHAPES[:1] if args.quick else SHAPES)
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    backends = tuple(args.backends.split(","))
    default_batch = args.batch or (16384 if args.quick else 65536)
    gate, others = [], []  # (shape, methods, batch): the gate shape's first
    for shape in shapes:
        big = [m for m in methods if m in STREAMING] if shape.label == GATE and not (args.batch or args.quick) else []
        plan = gate if shape.label == GATE else others
        if big:
            plan.append((shape, big, 1 << 20))
        if [m for m in methods if m not in big]:
            plan.append((shape, [m for m in methods if m not in big], default_batch))
    rows = []

    def check(plan) -> None:
        for shape, which, batch in plan:
            start = time.perf_counter()
            step = f"check {shape.name} (B={batch})"
            try:
                repeats = 1 if args.quick else 3
                rows.extend(
                    check_shape(shape, which, batch, args.check_rows, args.reference_rows, repeats, backends=backends)
                )
                steps.append({"step": step, "ok": True, "seconds": round(time.perf_counter() - start, 1)})
            except Exception as err:
                steps.append({"step": step, "ok": False, "detail": f"{type(err).__name__}: {err}"})
                print(f"{step}: FAILED {err}", flush=True)
            write_results(rows, steps, device, out)  # a run stopped at its time limit keeps what it measured

    check(gate)
    if not args.skip_tests:
        steps.append(gpu_tests(args.test_timeout, out))
        verdict = "ok" if steps[-1]["ok"] else "FAILED"
        print(f"pytest -m gpu: {verdict} ({steps[-1]['seconds']} s) {steps[-1]['detail'][:2000]}", flush=True)
        write_results(rows, steps, device, out)
    if not args.skip_profile:
        steps.append(profile(methods, backends, args.profile_timeout, out, device))
        print(f"ncu: {steps[-1]['detail']} ({steps[-1].get('seconds')} s)", flush=True)
        write_results(rows, steps, device, out)
    check(others)
    csv_path, md_path = write_results(rows, steps, device, out)
    print(f"wrote {csv_path} and {md_path}")
    failed = [s["step"] for s in steps if not s["ok"]] + [
        f"{r['shape']} {r['method']} {r['backend']}" for r in rows if not r.get("ok")
    ]
    if failed:
        print("FAILED: " + "; ".join(failed))
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aot", action="store_true", help="compile every kernel for sm_90 (no GPU needed)")
    parser.add_argument("--json", action="store_true", help="--aot: one JSON record per line")
    parser.add_argument("--quick", action="store_true", help="one shape, B = 16384, one timed call")
    parser.add_argument("--shapes", help="';'-separated shape names or labels (see SHAPES), or N=<n>:<dtype>")
    parser.add_argument("--methods", help="comma-separated methods (--aot: also 'loss' and 'topk')")
    parser.add_argument("--backends", default="cuda,triton", help="comma-separated GPU backends to check and time")
    parser.add_argument("--no-cuda", action="store_true", help="--aot: skip the CUDA extension")
    parser.add_argument("--cuda-from-module", action="store_true", help="--aot: cuobjdump the built module, not nvcc")
    parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-profile", action="store_true", help="do not run ncu")
    parser.add_argument("--profile-timeout", type=float, default=120)
    parser.add_argument("--profile-target", action="store_true", help=argparse.SUPPRESS)  # what ncu runs
    parser.add_argument("--build-timeout", type=float, default=240)
    parser.add_argument("--test-timeout", type=float, default=150)
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="samples per GPU call (default 2^20 for sd, ce and mf-lf at the gate shape, else 65536; quick 16384)",
    )
    parser.add_argument("--check-rows", type=int, default=2048, help="rows compared with the cpu backend")
    parser.add_argument("--reference-rows", type=int, default=16384, help="rows the torch reference is timed on")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.aot:
        return aot_main(args)
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    if args.profile_target:
        profile_target(tuple(args.methods.split(",")) if args.methods else METHODS, tuple(args.backends.split(",")))
        return 0
    return gpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
