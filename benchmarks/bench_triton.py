"""Fused Triton `ce` against the torch reference on the same GPU (issue 4's performance target).

Workload: K = 1000 classes, N = 20 teachers each covering ~25% of the classes (so each class is
seen by ~5 teachers and one sample's packed input has ~5000 values), B = 1M samples of float16
teacher probabilities (log-normal noise around a shared truth, so Newton has real work to do).

Reported, per path: seconds, samples/s, achieved memory bandwidth (the bytes the path must move:
float16 inputs read once and float32 soft labels written once) and executed FLOP/s (an analytic
count of the kernel's dense-tile arithmetic per Newton step times the steps actually taken),
each against the device's peak from nvidia-ml-py (bus width x memory clock; SMs x FP32 lanes x
SM clock). Paths:

- ``triton-kernel``: the `ce` kernel on packed float16 values (what a float16-preserving pack
  would hand it; today's pack upcasts to float32 first);
- ``triton-estimate``: ``uhc_fast.estimate(..., backend="triton")`` end to end (pack included);
- ``torch-reference``: ``estimate(..., backend="torch")``, timed on ``--reference-rows`` rows and
  scaled linearly to B (it works in fixed-size row chunks, so its time is linear in B; say
  ``--reference-rows 0`` to time it on all of B).

Without a CUDA device it prints why and exits 0. Results go to
``benchmarks/results/triton_ce_<gpu>.json`` and ``.md`` with the device named.

    python benchmarks/bench_triton.py [--batch 1000000] [--reference-rows 131072]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
# FP32 lanes per SM by compute capability major.minor (CUDA programming guide, arithmetic throughput)
_FP32_LANES = {(7, 0): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128, (10, 0): 128}


def device_peaks(index: int) -> dict[str, float | str]:
    """Peak memory bandwidth (B/s) and FP32 FLOP/s of CUDA device ``index`` (NVML where present)."""
    props = torch.cuda.get_device_properties(index)
    lanes = _FP32_LANES.get((props.major, props.minor), 128)
    peaks: dict[str, float | str] = {"gpu": props.name, "sms": props.multi_processor_count, "source": "torch"}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
            mem_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
            sm_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        finally:
            pynvml.nvmlShutdown()
        peaks.update(
            source="nvidia-ml-py",
            peak_bandwidth=bus_bits / 8 * mem_mhz * 1e6 * 2,  # double data rate
            peak_fp32_flops=props.multi_processor_count * lanes * 2 * sm_mhz * 1e6,  # FMA = 2 FLOPs
            sm_clock_mhz=sm_mhz,
            mem_clock_mhz=mem_mhz,
            bus_width_bits=bus_bits,
        )
    except Exception as err:  # NVML missing: report what we cannot compare against
        peaks.update(peak_bandwidth=float("nan"), peak_fp32_flops=float("nan"), nvml_error=repr(err))
    return peaks


def make_workload(
    batch: int, num_classes: int, num_teachers: int, coverage: float, seed: int, device: str, chunk: int = 1 << 16
):
    """Packed float16 probabilities ``(B, nnz)`` generated on the GPU in row chunks, and the teachers."""
    from benchmarks.workloads import class_sets
    from uhc_fast import TeacherSet

    teachers = TeacherSet(class_sets(num_classes, num_teachers, coverage=coverage, seed=seed), num_classes=num_classes)
    layout = teachers.layout(device)
    nnz = layout.nnz
    values = torch.empty(batch, nnz, dtype=torch.float16, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, batch, chunk):
        rows = min(chunk, batch - start)
        truth = 2.0 * torch.randn(rows, num_classes, device=device, generator=gen)
        z = truth[:, layout.class_index] + 0.3 * torch.randn(rows, nnz, device=device, generator=gen)
        z = z - z.amax(dim=1, keepdim=True)
        p = torch.exp(z)
        sums = torch.zeros(rows, num_teachers, device=device).index_add_(1, layout.teacher_index, p)
        values[start : start + rows] = (p / sums[:, layout.teacher_index]).half()
    return teachers, values


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls after one warm-up, synchronising the device."""
    result = fn()
    _sync()
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        result = fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def ce_flops_per_step(num_teachers: int, num_classes: int, block_n: int) -> float:
    """FLOPs one Newton step of the kernel executes per sample on its dense (BLOCK_N, K) tiles:
    the statistics pass (~8 per tile element plus the 2 BLOCK_N^2 K curvature product), the
    residual pass (~6), one line-search evaluation (~5) and the N^3-ish on-chip elimination."""
    tile = block_n * num_classes
    return tile * (8 + 6 + 5) + 2 * block_n * block_n * num_classes + 6 * num_teachers * block_n * block_n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--teachers", type=int, default=20)
    parser.add_argument("--coverage", type=float, default=0.25, help="fraction of the classes each teacher covers")
    parser.add_argument("--reference-rows", type=int, default=131072, help="0: time the reference on all rows")
    parser.add_argument(
        "--estimate-rows", type=int, default=262144, help="rows for the end-to-end estimate() timing (0: all)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--interpret-smoke",
        action="store_true",
        help="with TRITON_INTERPRET=1: run the script's code on CPU, tiny sizes",
    )
    args = parser.parse_args(argv)

    device = "cuda"
    if args.interpret_smoke:  # exercises this script without a GPU; its numbers mean nothing
        device = "cpu"
    elif not torch.cuda.is_available():
        print("bench_triton: no CUDA device here; skipping (the Triton benchmark needs a GPU)")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_triton: triton is not installed; skipping (pip install 'uhc_fast[triton]')")
        return 0

    import uhc_fast
    from uhc_fast.triton_backend import load_kernels

    kernels = load_kernels()
    from uhc_fast.kernels._common import block_n

    if device == "cuda":
        peaks = device_peaks(torch.cuda.current_device())
    else:
        peaks = {"gpu": "interpreter smoke run", "source": "none", "peak_bandwidth": float("nan")}
        peaks["peak_fp32_flops"] = float("nan")
    coverage = args.coverage * args.teachers  # teachers per class, as workloads.class_sets counts it
    teachers, values = make_workload(args.batch, args.classes, args.teachers, coverage, args.seed, device)
    layout = teachers.layout(device)
    batch, nnz, k, n = args.batch, layout.nnz, args.classes, args.teachers
    weights = torch.ones(n, device=device)
    cmap = kernels.colmap(layout)
    tol = 1e-5
    print(f"{peaks['gpu']}: ce, K={k}, N={n}, nnz={nnz} ({nnz / (k * n):.0%} coverage), B={batch}, float16 inputs")

    rows = []

    def record(path, seconds, samples, iterations, note=""):
        bytes_moved = samples * (nnz * 2 + k * 4)
        flops = float(iterations) * samples * ce_flops_per_step(n, k, block_n(n))
        row = {
            "path": path,
            "seconds": seconds,
            "samples": samples,
            "samples_per_s": samples / seconds,
            "mean_newton_steps": float(iterations),
            "bandwidth_GBps": bytes_moved / seconds / 1e9,
            "bandwidth_of_peak": bytes_moved / seconds / peaks["peak_bandwidth"],
            "TFLOPs": flops / seconds / 1e12,
            "flops_of_peak_fp32": flops / seconds / peaks["peak_fp32_flops"],
            "note": note,
        }
        rows.append(row)
        print(
            f"  {path:16s} {seconds:9.4f} s  {row['samples_per_s']:12.4g} samples/s  "
            f"{row['bandwidth_GBps']:8.1f} GB/s ({row['bandwidth_of_peak']:.1%} of peak)  "
            f"{row['TFLOPs']:7.2f} TFLOP/s ({row['flops_of_peak_fp32']:.1%} of FP32 peak)  {note}"
        )
        return row

    kernel_s, (soft_k, it_k, res_k) = timed(lambda: kernels.ce(values, weights, cmap, tol, 100), args.repeats)
    converged = float((res_k <= tol).float().mean())
    record("triton-kernel", kernel_s, batch, it_k.float().mean(), f"converged {converged:.4%}")

    outputs = [values[:, a:b] for a, b in zip(layout.offsets[:-1].tolist(), layout.offsets[1:].tolist())]
    # pack() makes float32 copies of the whole input (several times B x nnz x 4 bytes): time a slice
    est_rows = batch if args.estimate_rows <= 0 else min(batch, args.estimate_rows)
    head = [o[:est_rows] for o in outputs]
    est_s, soft_e = timed(lambda: uhc_fast.estimate(head, teachers, "ce", backend="triton"), args.repeats)
    est_s *= batch / est_rows
    note = "pack (float32 upcast) + kernel"
    if est_rows < batch:
        note += f"; timed on {est_rows} rows, scaled x{batch / est_rows:.2f}"
    record("triton-estimate", est_s, batch, it_k.float().mean(), note)
    del soft_e

    ref_rows = batch if args.reference_rows <= 0 else min(batch, args.reference_rows)
    sub = [o[:ref_rows] for o in outputs]
    ref_s, (soft_r, info_r) = timed(
        lambda: uhc_fast.estimate(sub, teachers, "ce", backend="torch", return_info=True), 1
    )
    scaled = ref_s * batch / ref_rows
    note = "timed on all rows" if ref_rows == batch else f"timed on {ref_rows} rows, scaled x{batch / ref_rows:.2f}"
    record("torch-reference", scaled, batch, info_r["iterations"].float().mean(), note)
    agreement = float((soft_r - soft_k[:ref_rows]).abs().max())
    print(f"  max |triton - reference| over the reference rows: {agreement:.3g}")
    speedup = scaled / kernel_s
    print(f"  speedup, kernel vs reference: {speedup:.1f}x; estimate() vs reference: {scaled / est_s:.1f}x")

    from benchmarks.machine import describe

    report = {
        "benchmark": "ce, fused Triton kernel vs torch reference",
        "workload": {"batch": batch, "classes": k, "teachers": n, "nnz": nnz, "input_dtype": "float16", "tol": tol},
        "device": peaks,
        "machine": describe(),
        "results": rows,
        "speedup_kernel_vs_reference": speedup,
        "speedup_estimate_vs_reference": scaled / est_s,
        "max_abs_difference": agreement,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "triton_ce_" + re.sub(r"[^A-Za-z0-9]+", "_", str(peaks["gpu"])).strip("_").lower()
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [
        f"# `ce`: fused Triton vs torch reference on {peaks['gpu']}",
        "",
        f"K={k}, N={n}, nnz={nnz}, B={batch}, float16 teacher probabilities, tol={tol}. "
        f"Peaks ({peaks['source']}): {peaks['peak_bandwidth'] / 1e9:.0f} GB/s, "
        f"{peaks['peak_fp32_flops'] / 1e12:.1f} FP32 TFLOP/s.",
        "",
        "| path | seconds | samples/s | GB/s (of peak) | TFLOP/s (of FP32 peak) | Newton steps | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['seconds']:.4f} | {r['samples_per_s']:.4g} | {r['bandwidth_GBps']:.0f} "
            f"({r['bandwidth_of_peak']:.1%}) | {r['TFLOPs']:.2f} ({r['flops_of_peak_fp32']:.1%}) | "
            f"{r['mean_newton_steps']:.2f} | {r['note']} |"
        )
    lines += ["", f"Speedup of the kernel over the reference: **{speedup:.1f}x** (target: 20x).", ""]
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print(f"  wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
