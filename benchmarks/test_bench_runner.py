"""The runner itself, on a tiny grid: rows, stamps, ratios, skips, tables and plots come out right.

Runs with the benchmark suite (``pytest benchmarks``), not with the main test suite.
"""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest

import uhc_fast

from . import measure, report, run, workloads


@pytest.mark.parametrize("family", workloads.FAMILIES)
@pytest.mark.parametrize(("k", "n"), [(2, 1), (10, 2), (10, 10), (10, 100), (1000, 10), (1000, 100)])
def test_class_sets_cover_and_connect(family, k, n):
    teachers = workloads.make(2, k, n, family=family).teachers
    assert teachers.num_teachers == n and teachers.num_classes == k
    assert not teachers.uncovered
    assert teachers.is_connected
    assert all(len(set(cs)) == len(cs) for cs in teachers.class_sets)


def test_subsets_draw_each_sources_coverage():
    """Random 25% subsets at K=1000, N=20: coverage per source within U(12.5%, 37.5%) (plus the few
    classes handed out to cover every class), and almost every class its own teacher set (G ~ K)."""
    sets = workloads.subsets(1000, 20, fraction=0.25)
    sizes = sorted(len(cs) for cs in sets)
    assert 125 <= sizes[0] and sizes[-1] <= 375 + 20
    assert max(sizes) - min(sizes) > 100  # drawn per source, not one size for all
    stats = workloads.stats(uhc_fast.TeacherSet(sets, num_classes=1000))
    assert stats["G"] > 900 and stats["nnz"] == sum(sizes)
    assert stats["d2_classes"] >= stats["d2_groups"] > 0
    windows = workloads.stats(workloads.make(1, 1000, 20, family="windows", fraction=0.25).teachers)
    assert windows["G"] < 100  # few distinct teacher sets: the secondary family


def test_unequal_sources_are_a_few_large_and_many_small():
    sizes = sorted(len(cs) for cs in workloads.unequal(5000, 8))
    assert sizes[-2] >= 0.4 * 5000 and sizes[-3] <= 0.05 * 5000 + 50  # two large, six small
    assert sizes[0] >= 2


def test_windows_are_the_earlier_family():
    """tests/oracles.py re-creates the windows family (``benchmark_workload``) with the same draws."""
    import math

    import numpy as np

    rng = np.random.default_rng(0)
    order = rng.permutation(10)
    starts = [(i * 10) // 10 for i in range(10)]
    expected = []
    for i, start in enumerate(starts):
        gap = (starts[i + 1] if i + 1 < 10 else 10) - start
        size = min(10, max(2, gap + 1, math.ceil(2.0 * rng.uniform(0.75, 1.25))))
        expected.append([int(order[c]) for c in rng.permutation([(start + j) % 10 for j in range(size)])])
    assert workloads.windows(10, 10) == expected


@pytest.mark.parametrize("family", workloads.FAMILIES)
def test_rows_do_not_depend_on_the_batch_size(family):
    small, large = workloads.make(3, 50, 4, family=family), workloads.make(7, 50, 4, family=family)
    for a, b in zip(small.outputs, large.outputs, strict=True):
        assert a.equal(b[:3])


def test_timing_summary():
    t = measure.Timing((4.0, 1.0, 3.0, 2.0))
    assert t.median == 2.5
    assert t.q25 == pytest.approx(1.75) and t.q75 == pytest.approx(3.25)


def test_skip_reason():
    state = run.State()
    key = ("torch/cpu", "ce", "solve", "subsets", 10)
    assert state.skip_reason(key, 100, 4, 1.0) is None
    state.cost[key] = [(10, 0.1)]  # 0.1 s per sample at nnz 10
    assert state.skip_reason(key, 100, 8, 1.0).startswith("skipped: predicted")  # 8 s per call > 5 x 1 s
    assert state.skip_reason(key, 11, 4, 1.0) is None
    state.too_slow[key] = (50, 9.0)
    assert "already" in state.skip_reason(key, 60, 1, 100.0)


def test_runner_tiny_grid(tmp_path, monkeypatch):
    tiny = replace(
        run.GRIDS["quick"],
        ks=(10, 30),
        ns=(2, 3),
        bs=(1, 4),
        base_k=10,
        base_n=3,
        secondary=(("windows", 10, 3), ("unequal", 30, 4)),
        peer_samples=2,
        peer_budget_s=0.5,
        repeats=2,
        call_budget_s=0.02,
        measure_budget_s=0.1,
        target_elements={"cpu": 1 << 10, "cuda": 1 << 12},
    )
    monkeypatch.setitem(run.GRIDS, "quick", tiny)
    peers = ["scipy"] if _importable("scipy") else []  # choix is checked in tests/test_peers.py
    argv = [
        "--quick",
        "--devices",
        "cpu",
        "--methods",
        "sd",
        "ce",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
        "--tag",
        "t",
        "--peers",
        *peers,
    ]
    assert run.main(argv) == 0

    with (tmp_path / "t.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(report.COLUMNS) | set(report.STAMP) == set(rows[0])
    ours = [r for r in rows if r["backend"] == "torch"]
    # every steady (family, K, N) point and every B of the sweep, for both methods and both phases
    steady = (("subsets", "10", "2"), ("subsets", "10", "3"), ("subsets", "30", "3"))
    steady += (("windows", "10", "3"), ("unequal", "30", "4"))
    assert {(r["family"], r["K"], r["N"], r["sweep_batch"], r["method"], r["phase"]) for r in ours} == {
        *((f, k, n, "", m, p) for f, k, n in steady for m in ("sd", "ce") for p in ("solve", "estimate")),
        *(("subsets", "10", "3", b, m, p) for b in ("1", "4") for m in ("sd", "ce") for p in ("solve", "estimate")),
    }
    for r in ours:
        assert r["status"].startswith("ok"), r
        assert float(r["samples_per_s"]) > 0 and float(r["x_torch"]) == 1.0
        assert float(r["max_abs_diff_vs_torch"]) <= 1e-5  # the same samples (B sweep: float32 batching)
        assert r["cpu_model"] and r["commit"] and r["torch"] and r["native_module"]
        assert int(r["G"]) >= 1 and int(r["nnz"]) >= int(r["K"])
        if r["phase"] == "estimate":
            assert float(r["estimate_over_solve"]) > 0
    ce = [r for r in ours if r["method"] == "ce" and not r["sweep_batch"]]
    assert all(float(r["converged_frac"]) == 1.0 and float(r["residual_max"]) <= float(r["tol"]) for r in ce)
    if "cpu" in {r["backend"] for r in rows}:  # the compiled backend agrees with the reference
        cpu = [r for r in rows if r["backend"] == "cpu" and r["status"].startswith("ok")]
        assert cpu and all(float(r["max_abs_diff_vs_torch"]) <= 1e-3 for r in cpu)
    if "scipy" in peers:
        scipy_rows = [r for r in rows if r["backend"] == "scipy"]
        assert len(scipy_rows) == 5
        assert all(float(r["residual_max"]) <= float(r["tol"]) for r in scipy_rows)
        assert all(float(r["max_abs_diff_vs_torch"]) < 1e-3 for r in scipy_rows)
        assert all(r["x_scipy"] for r in ce)

    md = (tmp_path / "t.md").read_text()
    assert "Throughput at a steady batch" in md and "| subsets | 30 | 3 |" in md and "Scaling" in md
    assert "Estimate end to end next to solve-only" in md and "| unequal | 30 | 4 |" in md
    if _importable("matplotlib"):
        assert (tmp_path / "t_throughput_vs_k.png").stat().st_size > 0
        assert (tmp_path / "t_scaling.png").stat().st_size > 0


def test_update_readme_replaces_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{report.README_START}\nold\n{report.README_END}\n\nafter\n")
    report.update_readme(readme, "### new\n\n![p.png](p.png)\n", "results/x.md")
    text = readme.read_text()
    assert "old" not in text and "### new" in text and "(results/p.png)" in text
    assert text.startswith("intro") and text.rstrip().endswith("after")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
