"""``python -m benchmarks.gpu``: its ahead-of-time mode, its no-GPU behaviour and its pieces.

The AOT compilation needs triton (and ptxas, which triton ships) but no GPU; it runs in a subprocess
without ``TRITON_INTERPRET``. The GPU mode itself runs only where a GPU is (``gpu`` marker).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("backend", "kernel", "method", "shape", "registers", "spill_bytes", "stack_bytes", "shared_bytes")


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_aot_mode_prints_one_record_per_kernel_and_shape():
    pytest.importorskip("triton")
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--aot", "--json", "--no-cuda", "--workers", "1"]
    cmd += ["--shapes", "N=3:float32;N=5:float16", "--methods", "sd,mf-lf,loss"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    # per shape: sd, mf-lf, the loss's forward and backward
    assert len(records) == 8, records
    assert {r["shape"] for r in records} == {"K=1000,N=3 float32", "K=1000,N=5 float16"}
    for r in records:
        for field in FIELDS:
            assert field in r, (field, r)
        assert r["backend"] == "triton" and r["error"] is None
        assert 0 < r["registers"] <= 255
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0
        assert r["shared_bytes"] >= 0 and r["num_warps"] in (4, 8)
        assert r["gate"] is False
    assert {r["kernel"] for r in records} == {
        "_sd_kernel",
        "_mf_lf_kernel",
        "_loss_forward_kernel",
        "_loss_backward_kernel",
    }
    summary = json.loads(done.stderr.strip().splitlines()[-1])
    assert summary["records"] == 8 and summary["errors"] == 0 and summary["gate_spills"] == []


def test_aot_mode_fails_on_a_spill_at_the_gate_shape(monkeypatch, capsys):
    spilled = {
        "backend": "triton",
        "kernel": "_ce_kernel",
        "method": "ce",
        "shape": "K=1000,N=20 float16",
        "gate": True,
        "registers": 255,
        "spill_bytes": 8,
        "stack_bytes": 8,
        "shared_bytes": 0,
        "error": None,
    }
    clean = {**spilled, "shape": "K=1000,N=64 float16", "gate": False}
    monkeypatch.setattr(gpu, "triton_records", lambda *args: [clean])
    assert gpu.main(["--aot", "--json", "--no-cuda"]) == 0  # spills away from the gate shape are reported only
    monkeypatch.setattr(gpu, "triton_records", lambda *args: [clean, spilled])
    assert gpu.main(["--aot", "--json", "--no-cuda"]) == 1
    out = capsys.readouterr()
    assert json.loads(out.err.strip().splitlines()[-1])["gate_spills"] == ["triton:_ce_kernel@K=1000,N=20 float16"]
    monkeypatch.setattr(gpu, "triton_records", lambda *args: [{**clean, "error": "CompilationError: ..."}])
    assert gpu.main(["--aot", "--no-cuda"]) == 1


def test_without_a_gpu_it_says_so_and_exits_0():
    env = {**_env(), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--skip-build"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == gpu.NO_GPU


def test_ptxas_log_parsing():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelIfEvPT_
    416 bytes stack frame, 12 bytes spill stores, 96 bytes spill loads
ptxas info    : Used 128 registers, used 0 barriers, 416 bytes cumulative stack size, 1024 bytes smem
ptxas info    : Compiling entry function '_Z6kernelIdEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelIdEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
"""
    stats = gpu.parse_ptxas(log)
    assert stats["_Z6kernelIfEvPT_"] == {
        "stack_bytes": 416,
        "spill_stores": 12,
        "spill_loads": 96,
        "registers": 128,
        "shared_bytes": 1024,
    }
    assert stats["_Z6kernelIdEvPT_"]["registers"] == 40 and stats["_Z6kernelIdEvPT_"]["spill_stores"] == 0


def test_test_log_parsing():
    log = """[gw1] [ 10%] PASSED tests/test_backends.py::test_matches_reference[sd-cuda-cuda]
[gw0] [ 20%] FAILED tests/test_native.py::test_cuda_launch_matches_its_grid_on_the_cpu[ce-torch.float16]
tests/test_oracles.py::test_gpu_matches_oracle[cuda-sd-float32] SKIPPED (needs a CUDA device)   [ 30%]
tests/test_backends.py::test_empty_batch[triton-ce] ERROR   [ 40%]
FAILED tests/test_native.py::test_cuda_launch_matches_its_grid_on_the_cpu[ce-torch.float16] - TypeError
"""
    assert gpu.parse_test_log(log) == {
        "tests/test_backends.py::test_matches_reference[sd-cuda-cuda]": "PASSED",
        "tests/test_native.py::test_cuda_launch_matches_its_grid_on_the_cpu[ce-torch.float16]": "FAILED",
        "tests/test_oracles.py::test_gpu_matches_oracle[cuda-sd-float32]": "SKIPPED",
        "tests/test_backends.py::test_empty_batch[triton-ce]": "ERROR",
    }


def test_a_step_stopped_at_its_limit_keeps_what_it_printed(tmp_path):
    log = tmp_path / "step.log"
    cmd = [sys.executable, "-c", "import time; print('PASSED tests/a.py::t', flush=True); time.sleep(60)"]
    code, seconds = gpu.run_into(cmd, 3, log)
    assert code == 124 and seconds < 30
    assert gpu.parse_test_log(log.read_text()) == {"tests/a.py::t": "PASSED"}


def test_the_gpu_run_measures_the_gate_shape_first(monkeypatch, tmp_path):
    """The order that keeps the most when a lease ends early: the gate shape (its streaming methods
    at B = 2^20), the tests, the profile, then the other shapes; results written after each."""
    calls = []

    def check_shape(shape, methods, batch, *args, **kwargs):
        calls.append(("check", shape.label, tuple(methods), batch))
        return [{"shape": shape.name, "method": m, "backend": "cuda", "ok": True} for m in methods]

    def step(name):
        return lambda *args: calls.append((name,)) or {"step": name, "ok": True, "seconds": 0.0, "detail": ""}

    monkeypatch.setattr(gpu, "check_shape", check_shape)
    monkeypatch.setattr(gpu, "gpu_tests", step("tests"))
    monkeypatch.setattr(gpu, "profile", step("profile"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    parser_args = ["--skip-build", "--out", str(tmp_path), "--shapes", "K=20000,N=8 float16;K=1000,N=20 float16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu.main(parser_args) == 0
    assert calls == [
        ("check", "K=1000,N=20", ("sd", "ce", "mf-lf"), 1 << 20),
        ("check", "K=1000,N=20", ("mf-p", "mf-lu"), 65536),
        ("tests",),
        ("profile",),
        ("check", "K=20000,N=8", gpu.METHODS, 65536),
    ]
    assert (tmp_path / "gpu-nvidia_h200.md").exists()


def test_shapes_and_the_model():
    assert [s.label for s in gpu.select_shapes(None)] == ["K=1000,N=20", "K=1000,N=20", "K=20000,N=8", "K=1000,N=64"]
    assert gpu.select_shapes("K=20000,N=8")[0].classes == 20000
    assert gpu.select_shapes("N=7:float64")[0].teachers == 7
    with pytest.raises(SystemExit):
        gpu.select_shapes("nonsense")
    import uhc_fast

    shape = gpu.SHAPES[0]
    sets = gpu.class_sets(shape)
    assert sorted(set().union(*map(set, sets))) == list(range(shape.classes))
    counts = gpu.structure_counts(uhc_fast.TeacherSet(sets, num_classes=shape.classes))
    assert counts["nnz"] >= shape.classes and counts["E"] >= counts["G"] and counts["Pc"] >= counts["P"]
    bandwidth, fp64 = gpu.peaks("NVIDIA H200")
    memory = {m: gpu.model(m, shape, counts, 5.0)[0] / bandwidth for m in gpu.METHODS}
    compute = {m: gpu.model(m, shape, counts, 5.0)[1] / fp64 for m in gpu.METHODS}
    assert memory["sd"] == memory["mf-lf"] > compute["sd"]  # memory-bound
    assert compute["ce"] > memory["ce"] and compute["mf-p"] > compute["ce"]  # float64 Newton: compute-bound
    windows = gpu.class_sets(gpu.SHAPES[2])
    assert len(windows) == 8 and sum(map(len, windows)) >= 2 * 20000


def test_results_files(tmp_path):
    rows = [
        {
            "device": "X",
            "shape": "K=1000,N=20 float16",
            "method": "ce",
            "backend": "triton",
            "ran_on": "triton",
            "batch": 4,
            "ok": True,
            "seconds": 0.5,
            "samples_per_s": 8.0,
            "GBps": 1.0,
            "of_hbm_roofline": 0.1,
            "of_model": 0.5,
            "speedup_vs_torch": 20.0,
            "max_diff_converged": 1e-6,
        },
        {
            "device": "X",
            "shape": "K=1000,N=20 float16",
            "method": "sd",
            "backend": "cuda",
            "ok": False,
            "detail": "boom",
        },
    ]
    steps = [
        {"step": "build", "ok": True, "seconds": 1.0},
        {"step": "pytest -m gpu", "ok": False, "detail": "1 failed"},
    ]
    csv_path, md_path = gpu.write_results(rows, steps, "NVIDIA H200", tmp_path)
    assert csv_path.name == "gpu-nvidia_h200.csv" and md_path.name == "gpu-nvidia_h200.md"
    text = md_path.read_text()
    assert "| pytest -m gpu | **no** |" in text and "| ce | triton | triton |" in text and "boom" in text
    assert csv_path.read_text().splitlines()[0].startswith("device,shape,method,backend")


@pytest.mark.interpret
def test_the_gpu_checks_run_on_the_cpu_through_the_interpreter(tmp_path):
    """The GPU mode's check and report code, exercised on a tiny shape with the Triton interpreter
    against the cpu backend (the numbers mean nothing; the code path and its assertions do)."""
    pytest.importorskip("triton")
    import uhc_fast

    if not uhc_fast.info()["triton"]["available"] or "cpu" not in uhc_fast.info()["triton"]["devices"]:
        pytest.skip("the Triton interpreter is not usable here")
    shape = gpu.Shape("K=9,N=3 float32", 9, 3, "subsets", 0.5, "float32")
    rows = gpu.check_shape(shape, ("sd", "ce"), 6, 4, 6, 1, device="cpu", backends=("triton",))
    assert [(r["method"], r["backend"], r["ran_on"]) for r in rows] == [
        ("sd", "triton", "triton"),
        ("ce", "triton", "triton"),
    ]
    assert all(r["ok"] for r in rows), rows
    assert rows[1]["converged"] == 1.0 and rows[1]["max_diff_converged"] <= 1e-4
    _, md_path = gpu.write_results(rows, [], "cpu", tmp_path)
    assert "| K=9,N=3 float32 | ce | triton | triton |" in md_path.read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_extension_statistics_from_nvcc():
    records = gpu.cuda_records(gpu.select_shapes("K=1000,N=20 float16"), "nvcc")
    assert records and all(r["error"] is None for r in records), records
    assert {r["method"] for r in records} == set(gpu.CUDA_METHOD_CODES)  # one kernel per method
    for r in records:
        assert r["backend"] == "cuda" and r["registers"] > 0 and r["spill_bytes"] == 0 and r["stack_bytes"] == 0


@pytest.mark.gpu
def test_quick_gpu_run(tmp_path):
    assert torch.cuda.is_available()
    code = gpu.main(
        ["--quick", "--skip-build", "--skip-tests", "--skip-profile", "--methods", "sd,ce", "--out", str(tmp_path)]
    )
    assert code == 0
    assert list(tmp_path.glob("gpu-*.csv")) and list(tmp_path.glob("gpu-*.md"))
