"""Writing results: the CSV (every row names the machine), the Markdown tables, the plots."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Result columns, then the machine/software stamp (machine.describe()) on every row.
COLUMNS = (
    "mode",
    "family",
    "sweep_batch",
    "K",
    "N",
    "nnz",
    "G",
    "E",
    "d2_classes",
    "d2_groups",
    "dtype",
    "method",
    "phase",
    "backend",
    "device",
    "batch",
    "repeats",
    "samples_per_s",
    "median_s",
    "q25_s",
    "q75_s",
    "min_s",
    "max_s",
    "spread_pct",
    "gbytes_per_s",
    "pct_copy_bw",
    "peak_mem_bytes",
    "iters_mean",
    "iters_max",
    "residual_median",
    "residual_max",
    "converged_frac",
    "tol",
    "max_abs_diff_vs_torch",
    "x_torch",
    "x_scipy",
    "x_choix",
    "estimate_over_solve",
    "status",
)
STAMP = (
    "date",
    "load_avg",
    "load_end",
    "cpu_model",
    "cpu_cores",
    "torch_threads",
    "gpu_name",
    "gpu_memory_gib",
    "gpu_clocks_mhz",
    "python",
    "torch",
    "numpy",
    "scipy",
    "choix",
    "triton",
    "uhc_fast",
    "commit",
    "native_module",
)
PRIMARY = "subsets"  # the workload family of the K, N and B sweeps
README_START = "<!-- benchmark-results:start -->"
README_END = "<!-- benchmark-results:end -->"


@dataclass(frozen=True)
class Context:
    """What a report says about its run besides the rows."""

    stamp: dict
    grid: object
    notes: list
    bandwidth: dict
    elapsed_s: float
    dtype: str
    tol: float
    command: str


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *STAMP], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in (*COLUMNS, *STAMP)})
    return path


# ---------------------------------------------------------------------- formatting
def _g(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 10**digits or abs(x) < 10 ** -(digits - 1):
        return f"{x:.{digits - 1}e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{x:.{digits}g}"


def _rate(x) -> str:
    if not x:
        return "–"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _ratio(x) -> str:
    return "–" if x is None else (f"{x:.3g}×" if x < 100 else f"{x:.0f}×")


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _label(row: dict) -> str:
    return (
        row["backend"]
        if row["backend"] in ("scipy",) or row["backend"].startswith("choix")
        else (f"{row['backend']}/{row['device']}")
    )


def steady_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("sweep_batch") is None]


def main_table(rows: list[dict]) -> str:
    body = []
    for r in steady_rows(rows):
        if str(r.get("status", "")).startswith("n/a"):
            continue  # combinations that do not exist (a backend without that method) stay in the CSV only
        iters = "–" if r.get("iters_mean") is None else f"{r['iters_mean']:.1f} / {r['iters_max']}"
        conv = "–" if r.get("converged_frac") is None else f"{100 * r['converged_frac']:.0f}%"
        bw = "–" if not r.get("gbytes_per_s") else f"{r['gbytes_per_s']:.3g}"
        if r.get("pct_copy_bw"):
            bw += f" ({r['pct_copy_bw']:.0f}%)"
        spread = "–" if r.get("spread_pct") is None else f"{r['spread_pct']:.0f}%"
        body.append(
            [
                r.get("family", "–"),
                str(r["K"]),
                str(r["N"]),
                str(r.get("G", "–")),
                str(r["nnz"]),
                r["method"],
                r["phase"],
                _label(r),
                str(r.get("batch", "–")),
                _rate(r.get("samples_per_s")),
                spread,
                bw,
                _mib(r.get("peak_mem_bytes")),
                iters,
                _g(r.get("residual_max"), 2),
                conv,
                _g(r.get("max_abs_diff_vs_torch"), 2),
                _ratio(r.get("x_torch")),
                _ratio(r.get("x_scipy")),
                _ratio(r.get("x_choix")),
                r.get("status", ""),
            ]
        )
    header = [
        "family",
        "K",
        "N",
        "G",
        "nnz",
        "method",
        "phase",
        "backend",
        "B",
        "samples/s",
        "IQR",
        "GB/s (% copy)",
        "peak MiB",
        "iters mean / max",
        "residual max",
        "conv",
        "max abs Δ vs torch",
        "× torch",
        "× scipy",
        "× choix",
        "status",
    ]
    return _table(header, body)


def phase_table(rows: list[dict]) -> str:
    """Per problem, method and backend: solve-only and ``estimate`` end to end side by side."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in steady_rows(rows):
        if r["backend"] in ("scipy",) or r["backend"].startswith("choix") or r["method"] == "loss":
            continue
        key = (r.get("family", "–"), r["K"], r["N"], r.get("G", "–"), r["nnz"], r["method"], _label(r))
        cells.setdefault(key, {})[r["phase"]] = r
    body = []
    for (family, k, n, g, nnz, method, label), phases in cells.items():
        solve, est = phases.get("solve", {}), phases.get("estimate", {})
        if not solve.get("samples_per_s") and not est.get("samples_per_s"):
            continue
        body.append(
            [
                family,
                str(k),
                str(n),
                str(g),
                str(nnz),
                method,
                label,
                _rate(solve.get("samples_per_s")),
                _rate(est.get("samples_per_s")),
                _g(est.get("estimate_over_solve"), 3),
                _ratio(solve.get("x_torch")),
                _ratio(est.get("x_torch")),
            ]
        )
    header = ["family", "K", "N", "G", "nnz", "method", "backend", "solve /s", "estimate /s", "estimate / solve"]
    return _table([*header, "solve × torch", "estimate × torch"], body)


def batch_table(rows: list[dict]) -> str:
    sweep = [r for r in rows if r.get("sweep_batch") is not None]
    if not sweep:
        return ""
    batches = sorted({r["sweep_batch"] for r in sweep})
    series: dict[tuple, dict[int, float]] = {}
    for r in sweep:
        series.setdefault((r["method"], r["phase"], _label(r)), {})[r["sweep_batch"]] = r.get("samples_per_s")
    body = [[m, ph, lab, *(_rate(v.get(b)) for b in batches)] for (m, ph, lab), v in series.items()]
    return _table(["method", "phase", "backend", *(f"B={b}" for b in batches)], body)


def _slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x and y and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def scaling(rows: list[dict], base_k: int, base_n: int) -> list[dict]:
    """Per (method, phase, backend): log-log slopes of seconds/sample against K, nnz and N, and the
    per-call overhead (seconds at the smallest B) versus the steady per-sample cost."""
    out = []
    steady = [r for r in steady_rows(rows) if r.get("samples_per_s") and r.get("family", PRIMARY) == PRIMARY]
    keys = sorted({(r["method"], r["phase"], _label(r)) for r in steady})
    for key in keys:
        mine = [r for r in steady if (r["method"], r["phase"], _label(r)) == key]
        k_sweep = sorted((r for r in mine if r["N"] == base_n), key=lambda r: r["K"])
        n_sweep = sorted((r for r in mine if r["K"] == base_k), key=lambda r: r["N"])
        entry = {
            "method": key[0],
            "phase": key[1],
            "backend": key[2],
            "slope_k": _slope([r["K"] for r in k_sweep], [1 / r["samples_per_s"] for r in k_sweep]),
            "slope_n": _slope([r["N"] for r in n_sweep], [1 / r["samples_per_s"] for r in n_sweep]),
            "k_range": (k_sweep[0]["K"], k_sweep[-1]["K"]) if k_sweep else None,
            "n_range": (n_sweep[0]["N"], n_sweep[-1]["N"]) if n_sweep else None,
        }
        b_sweep = sorted(
            (
                r
                for r in rows
                if r.get("sweep_batch") and r.get("samples_per_s") and (r["method"], r["phase"], _label(r)) == key
            ),
            key=lambda r: r["sweep_batch"],
        )
        if b_sweep:
            entry["call_overhead_s"] = b_sweep[0]["median_s"]
            entry["overhead_batch"] = b_sweep[0]["sweep_batch"]
            entry["steady_s_per_sample"] = b_sweep[-1]["median_s"] / b_sweep[-1]["sweep_batch"]
            entry["slope_b"] = _slope([r["sweep_batch"] for r in b_sweep], [r["median_s"] for r in b_sweep])
        out.append(entry)
    return out


def scaling_table(rows: list[dict], base_k: int, base_n: int) -> str:
    body = []
    for e in scaling(rows, base_k, base_n):
        kr = f" (K {e['k_range'][0]}–{e['k_range'][1]})" if e.get("k_range") and e["slope_k"] is not None else ""
        nr = f" (N {e['n_range'][0]}–{e['n_range'][1]})" if e.get("n_range") and e["slope_n"] is not None else ""
        body.append(
            [
                e["method"],
                e["phase"],
                e["backend"],
                _g(e["slope_k"], 2) + kr,
                _g(e["slope_n"], 2) + nr,
                _g(e.get("slope_b"), 2),
                _g(e.get("call_overhead_s"), 2),
                _g(e.get("steady_s_per_sample"), 2),
            ]
        )
    header = [
        "method",
        "phase",
        "backend",
        f"d log t / d log K (N={base_n})",
        f"d log t / d log N (K={base_k})",
        "d log(call) / d log B",
        "call at smallest B (s)",
        "s/sample at largest B",
    ]
    return _table(header, body)


def markdown(rows: list[dict], ctx: Context, plot_names: list[str]) -> str:
    from .machine import machine_line

    s, g = ctx.stamp, ctx.grid
    bw = ", ".join(f"{d} {v:.3g} GB/s" for d, v in ctx.bandwidth.items())
    lines = [
        f"### uhc_fast benchmarks: {g.name} grid, {s['date'][:10]}",
        "",
        f"- Machine: {machine_line(s)}; tensor-copy bandwidth {bw}; load at the end {s.get('load_end', '?')}.",
        f"- Software: uhc_fast {s['uhc_fast']} at commit `{s['commit']}` (native module "
        f"`{s.get('native_module', '?')}`), Python {s['python']}, torch {s['torch']}, "
        f"numpy {s['numpy']}, scipy {s['scipy'] or '–'}, choix {s['choix'] or '–'}, triton {s['triton'] or '–'}.",
        f"- Problems: {ctx.dtype}, tol {ctx.tol:g} (iterative methods), {g.warmup} warm-up + up to {g.repeats} "
        f"timed calls per row (fewer when one call is slow), run took {ctx.elapsed_s:.0f} s: `{ctx.command}`.",
        f"- Peers: one sample per call on {g.peer_samples} samples at most ({g.peer_budget_s:g} s budget), "
        f"float64; choix counts = round({g.choix_scale:g} · p).",
    ]
    if ctx.notes:
        lines.append("- Not measured: " + "; ".join(ctx.notes) + ".")
    lines += [
        f"- Workloads: `{PRIMARY}` (random class subsets, coverage drawn per source; the sweeps), `windows` and "
        "`unequal` (a few large sources, many small) as single rows; G = distinct teacher sets among the classes.",
        "",
        "#### Estimate end to end next to solve-only",
        "",
        phase_table(rows),
        "",
        "#### Throughput at a steady batch",
        "",
        main_table(rows),
        "",
    ]
    bt = batch_table(rows)
    if bt:
        lines += [f"#### Samples/s against the batch size (K={g.base_k}, N={g.base_n})", "", bt, ""]
    lines += ["#### Scaling (log-log slopes of seconds per sample)", "", scaling_table(rows, g.base_k, g.base_n), ""]
    for name in plot_names:
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def update_readme(readme: Path, md: str, md_link: str) -> None:
    """Replace the text between the README's result markers with ``md`` (image links made relative
    to the README)."""
    text = readme.read_text() if readme.exists() else ""
    body = re.sub(r"!\[([^\]]*)\]\(([^)/]+)\)", r"![\1](results/\2)", md)
    block = f"{README_START}\n_Generated by `benchmarks/run.py` ([{md_link}]({md_link}))._\n\n{body}\n{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        tail = rest.split(README_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


# ---------------------------------------------------------------------- plots
def _log_ticks(ax, values) -> None:
    """Label a log axis at the grid's own values, as plain numbers."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    if values:
        ax.xaxis.set_major_locator(FixedLocator(sorted(values)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())


def plots(rows: list[dict], ctx: Context, out: Path, stem: str) -> list[Path]:
    """``<stem>_throughput_vs_k.png`` and ``<stem>_scaling.png`` (empty list without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from .machine import machine_line

    g = ctx.grid
    title = f"{machine_line(ctx.stamp)} · {ctx.stamp['commit']} · {ctx.dtype}"
    steady = [
        r
        for r in steady_rows(rows)
        if r.get("samples_per_s") and r["phase"] == "solve" and r.get("family", PRIMARY) == PRIMARY
    ]
    methods = list(dict.fromkeys(r["method"] for r in steady))
    labels = sorted({_label(r) for r in steady})
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    paths = []

    # throughput against K at N = base_n, one panel per method
    cols = min(3, max(1, len(methods)))
    panels = max(1, len(methods))
    fig, axes = plt.subplots(
        math.ceil(panels / cols), cols, figsize=(5 * cols, 3.6 * math.ceil(panels / cols)), squeeze=False
    )
    for ax, method in zip(axes.flat, methods, strict=False):
        for lab in labels:
            pts = sorted(
                (r["K"], r["samples_per_s"])
                for r in steady
                if r["method"] == method and _label(r) == lab and r["N"] == g.base_n
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=lab, color=colors[lab])
        ax.set(xscale="log", yscale="log", xlabel="K (classes)", ylabel="samples/s", title=f"{method} (N={g.base_n})")
        _log_ticks(ax, g.ks)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    fig.suptitle(f"Throughput against K (random class subsets)\n{title}", fontsize=9)
    fig.tight_layout()
    path = out / f"{stem}_throughput_vs_k.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    # seconds per sample against B, K and N (log-log): colour = method, line style = backend
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    styles = ["-", "--", ":", "-."]
    method_colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    ours = [lab for lab in labels if "/" in lab]
    for li, lab in enumerate(ours):
        for method in methods:
            mine = [
                r
                for r in rows
                if r["method"] == method
                and _label(r) == lab
                and r.get("samples_per_s")
                and r["phase"] == "solve"
                and r.get("family", PRIMARY) == PRIMARY
            ]
            b_pts = sorted((r["sweep_batch"], r["median_s"]) for r in mine if r.get("sweep_batch"))
            k_pts = sorted(
                (r["K"], 1 / r["samples_per_s"]) for r in mine if r.get("sweep_batch") is None and r["N"] == g.base_n
            )
            n_pts = sorted(
                (r["N"], 1 / r["samples_per_s"]) for r in mine if r.get("sweep_batch") is None and r["K"] == g.base_k
            )
            for ax, pts in zip(axes, (b_pts, k_pts, n_pts), strict=True):
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        styles[li % len(styles)],
                        marker="o",
                        ms=3,
                        color=method_colors[method],
                        label=f"{method} · {lab}",
                    )
    axes[0].set(xlabel=f"B (K={g.base_k}, N={g.base_n})", ylabel="seconds per call", title="cost of one call vs B")
    axes[1].set(xlabel=f"K (N={g.base_n})", ylabel="seconds per sample", title="per-sample cost vs K")
    axes[2].set(xlabel=f"N (K={g.base_k})", ylabel="seconds per sample", title="per-sample cost vs N")
    for ax, values in zip(axes, (g.bs, g.ks, g.ns), strict=True):
        ax.set(xscale="log", yscale="log")
        _log_ticks(ax, values)
        ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="center right", fontsize=7)
    fig.suptitle(f"Scaling of cost (random class subsets)\n{title}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path = out / f"{stem}_scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
