"""The demo's output: the Markdown table and report, the plot and the raw numbers as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .experiment import CENTRALISED, DIRECT, DemoResult


def _std(values: np.ndarray) -> float:
    """Sample standard deviation over the splits (0 for a single split)."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _fmt(values: np.ndarray) -> str:
    return f"{100 * values.mean():5.1f} ± {100 * _std(values):3.1f}"


def format_table(result: DemoResult) -> str:
    """The results as a Markdown table: mean ± standard deviation over the splits, in %."""
    central = result.student(CENTRALISED).mean()
    lines = [
        "| soft labels from | student test accuracy (%) | vs centralised (points) | argmax of soft labels on U (%) |",
        "|---|---|---|---|",
    ]
    names = {CENTRALISED: "centralised, supervised (labels)", DIRECT: "ce, direct (UHCLoss on student logits)"}
    for row in result.rows():
        acc = result.student(row)
        gap = "" if row == CENTRALISED else f"{100 * (acc.mean() - central):+5.1f}"
        labels = _fmt(result.labels(row)) if row in result.config.methods else ""
        lines.append(f"| {names.get(row, row)} | {_fmt(acc)} | {gap} | {labels} |")
    return "\n".join(lines)


def format_report(result: DemoResult) -> str:
    c = result.config
    teacher = np.array([a for s in result.splits for a in s.teacher_accuracy])
    sizes = [len(cs) for s in result.splits for cs in s.class_sets]
    balance = "on" if c.balance else "off"
    eps = "" if c.eps is None else f", eps {c.eps:g}"
    n = result.splits[0].sizes
    head = (
        f"uhc-fast demo: scikit-learn digits (1797 images, 10 classes), {c.splits} random splits, "
        f"{c.teachers} sources with {min(sizes)}-{max(sizes)} classes each "
        f"({', '.join(dict.fromkeys(result.splits[0].architectures))}), class balancing {balance}{eps}.\n"
        f"Images per split: {n['pool']} labelled (split among the sources), {n['unlabelled']} unlabelled, "
        f"{n['test']} test.\n"
        f"Teachers' accuracy on test images of their own classes: {_fmt(teacher)} %.\n"
        f"Estimation backends: {', '.join(sorted(set(result.splits[0].backends.values())))}.\n"
    )
    iters = {
        m: np.mean([s.iterations[m] for s in result.splits]) for m in c.methods if m in result.splits[0].iterations
    }
    tail = "\nMean solver iterations: " + ", ".join(f"{m} {v:.1f}" for m, v in iters.items()) if iters else ""
    return head + "\n" + format_table(result) + "\n" + tail + f"\n({result.seconds:.0f} s)"


def plot(result: DemoResult, path: Path) -> Path:
    """Bar chart of the students' test accuracy (and the soft labels' argmax accuracy), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows() if r != CENTRALISED]
    pos = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    central = result.student(CENTRALISED)
    ax.axhspan(100 * (central.mean() - _std(central)), 100 * (central.mean() + _std(central)), color="0.85")
    ax.axhline(100 * central.mean(), color="0.3", ls="--", label="centralised, supervised")
    acc = [result.student(r) for r in rows]
    ax.bar(
        pos - 0.2,
        [100 * a.mean() for a in acc],
        0.4,
        yerr=[100 * _std(a) for a in acc],
        capsize=3,
        label="student test accuracy",
        color="tab:blue",
    )
    lab = [result.labels(r) if r in result.config.methods else None for r in rows]
    ax.bar(
        pos[[a is not None for a in lab]] + 0.2,
        [100 * a.mean() for a in lab if a is not None],
        0.4,
        yerr=[100 * _std(a) for a in lab if a is not None],
        capsize=3,
        color="tab:orange",
        label="argmax of soft labels on unlabelled set",
    )
    ax.set_xticks(pos, [r.replace(DIRECT, "ce direct\n(UHCLoss)") for r in rows])
    low = min(min(a.mean() for a in acc), central.mean()) * 100
    ax.set_ylim(max(0, math.floor(low / 5) * 5 - 5), 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Unifying heterogeneous classifiers on digits ({result.config.splits} splits, mean ± std)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(result: DemoResult, path: Path) -> Path:
    """The raw numbers (config, per-split results, seconds) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
    return path
