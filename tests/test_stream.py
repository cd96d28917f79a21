"""Streaming estimation from a manifest: agreement with uhc_fast.estimate, outputs, resume, memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import uhc_fast
from uhc_fast.stream import JobError, ManifestError, estimate_manifest, load_manifest, output_paths

REPO = Path(uhc_fast.__file__).resolve().parent.parent
# Class sets over K=9 classes with a connected overlap graph; class 8 is covered by one teacher.
CLASS_SETS = [[0, 1, 2, 3, 4], [3, 4, 5, 6], [6, 7, 8, 0], [1, 5, 7]]


def make_job(
    folder: Path,
    batch: int = 300,
    *,
    kinds=("probs",) * 4,
    dtype=np.float32,
    seed: int = 0,
    class_sets=CLASS_SETS,
    union: list[str] | None = None,
    noise: float = 0.0,
    name="job.json",
):
    """Write a manifest and teacher .npy files that are consistent with hidden soft labels ``q``.

    Returns ``(manifest_path, q)`` with ``q`` ``(batch, K)`` float64. Logit teachers get a random
    per-sample shift; ``noise`` perturbs the teachers so the estimate is not exact.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = max(max(cs) for cs in class_sets) + 1
    names = union if union is not None else [f"class{c}" for c in range(k)]
    q = rng.dirichlet(np.ones(k), size=batch)
    teachers = []
    for i, (cs, kind) in enumerate(zip(class_sets, kinds, strict=True)):
        p = q[:, cs] * np.exp(noise * rng.standard_normal((batch, len(cs))))
        p = p / p.sum(1, keepdims=True)
        arr = np.log(p) + rng.normal(size=(batch, 1)) if kind == "logits" else p
        file = f"teacher{i}.npy"
        np.save(folder / file, np.ascontiguousarray(arr, dtype=dtype))
        teachers.append({"name": f"t{i}", "classes": [names[c] for c in cs], "outputs": file, "kind": kind})
    manifest = {"classes": names, "teachers": teachers}
    path = folder / name
    path.write_text(json.dumps(manifest))
    return path, q


def chunked_reference(manifest_path: Path, method: str, chunk_size: int, **kwargs) -> np.ndarray:
    """What the stream must produce: uhc_fast.estimate on each fixed chunk, all in memory."""
    m = load_manifest(manifest_path)
    arrays = [np.load(t.path) for t in m.teachers]
    kinds = m.kinds
    assert len(kinds) == 1, "the reference handles one input kind"
    parts = []
    for start in range(0, m.num_samples, chunk_size):
        chunk = [torch.from_numpy(np.ascontiguousarray(a[start : start + chunk_size])) for a in arrays]
        parts.append(
            uhc_fast.estimate(
                chunk, m.teacher_set, method, inputs=next(iter(kinds)), backend="auto", weights=m.weights, **kwargs
            ).numpy()
        )
    return np.concatenate(parts)


def run_cli(args: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m uhc_fast.commands ARGS`` in a fresh process (so it can be killed)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "uhc_fast.commands", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------- agreement
@pytest.mark.parametrize("method", ["sd", "ce", "mf-p", "mf-lf", "mf-lu"])
def test_stream_equals_estimate_per_chunk(tmp_path, method):
    kind = "logits" if method in ("mf-lf", "mf-lu") else "probs"
    manifest, _ = make_job(tmp_path, batch=230, kinds=(kind,) * 4, noise=0.1)
    out = tmp_path / "out" / "soft.npy"
    result = estimate_manifest(manifest, out, method, chunk_size=100, progress=False)
    assert result.status == "complete" and result.chunks_total == 3 and result.samples_run == 230
    got = np.load(out)
    # Same chunks through the same function: bit-identical.
    np.testing.assert_array_equal(got, chunked_reference(manifest, method, 100).astype(np.float32))
    assert not output_paths(out)["partial"].exists()


def test_stream_recovers_consistent_soft_labels(tmp_path):
    manifest, q = make_job(tmp_path, batch=257, dtype=np.float64)
    out = tmp_path / "soft.npy"
    estimate_manifest(manifest, out, "ce", chunk_size=64, dtype="float64", progress=False)
    np.testing.assert_allclose(np.load(out), q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["ce", "mf-lf"])
def test_mixed_probs_and_logits_teachers(tmp_path, method):
    # The same hidden q through teachers of mixed kinds and through all-probability teachers.
    mixed, q = make_job(tmp_path / "mixed", batch=120, kinds=("probs", "logits", "probs", "logits"), dtype=np.float64)
    plain, _ = make_job(tmp_path / "plain", batch=120, dtype=np.float64)
    estimate_manifest(mixed, tmp_path / "a.npy", method, dtype="float64", progress=False)
    estimate_manifest(plain, tmp_path / "b.npy", method, dtype="float64", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), q, rtol=0, atol=1e-7)


def test_float16_output_and_top_k(tmp_path):
    manifest, _ = make_job(tmp_path, batch=150)
    estimate_manifest(manifest, tmp_path / "full.npy", "ce", chunk_size=64, progress=False)
    estimate_manifest(manifest, tmp_path / "half.npy", "ce", chunk_size=64, dtype="float16", progress=False)
    result = estimate_manifest(manifest, tmp_path / "top.npy", "ce", chunk_size=64, top_k=3, progress=False)
    full = np.load(tmp_path / "full.npy")
    half = np.load(tmp_path / "half.npy")
    assert half.dtype == np.float16 and half.shape == full.shape
    np.testing.assert_array_equal(half, full.astype(np.float16))
    values, index = np.load(tmp_path / "top.npy"), np.load(result.indices)
    assert result.indices == tmp_path / "top.indices.npy"
    assert values.shape == index.shape == (150, 3) and index.dtype == np.int32
    ref_values, _ = torch.topk(torch.from_numpy(full), 3, dim=1)
    np.testing.assert_array_equal(values, ref_values.numpy())
    np.testing.assert_array_equal(np.take_along_axis(full, index.astype(np.int64), 1), values)
    assert (np.diff(values, axis=1) <= 0).all()
    side = json.loads((tmp_path / "top.json").read_text())
    assert side["files"] == {"values": "top.npy", "indices": "top.indices.npy"} and side["shape"] == [150, 3]


def test_sidecar_describes_the_job(tmp_path):
    manifest, _ = make_job(tmp_path, batch=130)
    out = tmp_path / "soft.npy"
    estimate_manifest(manifest, out, "ce", chunk_size=50, temperature=1.0, progress=False)
    side = json.loads((tmp_path / "soft.json").read_text())
    assert side["status"] == "complete" and side["method"] == "ce"
    assert side["classes"] == [f"class{c}" for c in range(9)]
    assert side["shape"] == [130, 9] and side["dtype"] == "float32"
    assert side["parameters"]["chunk_size"] == 50
    assert [(c["chunk"], c["start"], c["stop"]) for c in side["chunks"]] == [(0, 0, 50), (1, 50, 100), (2, 100, 130)]
    assert all(c["not_converged"] == 0 and c["iterations_max"] >= 1 for c in side["chunks"])
    assert side["summary"]["samples"] == 130 and side["summary"]["not_converged"] == 0
    assert [t["name"] for t in side["teachers"]] == ["t0", "t1", "t2", "t3"]


@pytest.mark.parametrize("method", ["sd", "mf-lf"])
def test_uncovered_class_in_fixed_union_gets_zero_mass(tmp_path, method):
    kind = "logits" if method == "mf-lf" else "probs"
    manifest, _ = make_job(tmp_path, batch=8, dtype=np.float64, kinds=(kind,) * 4)
    estimate_manifest(manifest, tmp_path / "plain.npy", method, dtype="float64", progress=False)
    raw = json.loads(manifest.read_text())
    raw["classes"] = [*raw["classes"], "nobody"]
    manifest.write_text(json.dumps(raw))
    estimate_manifest(manifest, tmp_path / "soft.npy", method, dtype="float64", progress=False)
    soft = np.load(tmp_path / "soft.npy")
    assert soft.shape == (8, 10)
    np.testing.assert_array_equal(soft[:, 9], 0.0)
    np.testing.assert_allclose(soft[:, :9], np.load(tmp_path / "plain.npy"), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- errors before work
def test_bad_inputs_fail_before_any_file_is_written(tmp_path):
    manifest, _ = make_job(tmp_path, batch=20)
    out = tmp_path / "o" / "soft.npy"
    with pytest.raises(ValueError, match="method="):
        estimate_manifest(manifest, out, "nope")
    with pytest.raises(ValueError, match="dtype="):
        estimate_manifest(manifest, out, dtype="int8")
    with pytest.raises(ValueError, match="chunk_size="):
        estimate_manifest(manifest, out, chunk_size=0)
    with pytest.raises(ValueError, match="top_k="):
        estimate_manifest(manifest, out, top_k=10)
    with pytest.raises(ValueError, match=r"\.npy path"):
        estimate_manifest(manifest, tmp_path / "soft.bin")
    with pytest.raises(ValueError, match="temperature="):
        estimate_manifest(manifest, out, temperature=0)
    with pytest.raises(ManifestError, match="file not found"):
        estimate_manifest(tmp_path / "missing.json", out)
    assert not (tmp_path / "o").exists()


def test_bad_values_name_teacher_and_global_sample(tmp_path):
    manifest, _ = make_job(tmp_path, batch=200)
    arr = np.load(tmp_path / "teacher2.npy")
    arr[137, 1] = np.nan
    np.save(tmp_path / "teacher2.npy", arr)
    with pytest.raises(ValueError, match=r"teacher 2 \('t2'\), sample 137: outputs contain NaN"):
        estimate_manifest(manifest, tmp_path / "soft.npy", "ce", chunk_size=50, progress=False)
    # The chunks before the bad one are kept for a resume once the input is fixed.
    assert len(list((tmp_path / "soft.npy.partial" / "chunks").glob("*.json"))) == 2


# ---------------------------------------------------------------------- existing outputs, resume, force
def test_rerun_of_finished_job_does_nothing_unless_forced(tmp_path):
    manifest, _ = make_job(tmp_path, batch=60)
    out = tmp_path / "soft.npy"
    estimate_manifest(manifest, out, "sd", progress=False)
    stamp = (out.stat().st_mtime_ns, (tmp_path / "soft.json").stat().st_mtime_ns)
    again = estimate_manifest(manifest, out, "sd", progress=False)
    assert again.status == "already complete" and again.chunks_run == 0
    assert (out.stat().st_mtime_ns, (tmp_path / "soft.json").stat().st_mtime_ns) == stamp
    assert estimate_manifest(manifest, out, "sd", resume=True, progress=False).status == "already complete"
    forced = estimate_manifest(manifest, out, "sd", force=True, progress=False)
    assert forced.status == "complete" and forced.chunks_run == 1


def test_existing_outputs_need_resume_or_force(tmp_path):
    manifest, _ = make_job(tmp_path, batch=60)
    out = tmp_path / "soft.npy"
    np.save(out, np.zeros(3))
    with pytest.raises(JobError, match="already exists; pass --force"):
        estimate_manifest(manifest, out, "sd", progress=False)
    with pytest.raises(JobError, match="already exists; pass --force"):
        estimate_manifest(manifest, out, "sd", resume=True, progress=False)
    estimate_manifest(manifest, out, "sd", force=True, progress=False)
    assert np.load(out).shape == (60, 9)
    with pytest.raises(JobError, match=r"result of a different job \(differs in \['method'\]\)"):
        estimate_manifest(manifest, out, "ce", progress=False)


def test_changed_inputs_are_a_different_job(tmp_path):
    manifest, _ = make_job(tmp_path, batch=60)
    out = tmp_path / "soft.npy"
    estimate_manifest(manifest, out, "sd", progress=False)
    arr = np.load(tmp_path / "teacher0.npy")
    before = os.stat(tmp_path / "teacher0.npy")
    np.save(tmp_path / "teacher0.npy", arr[:, ::-1].copy())  # new content, same shape
    os.utime(tmp_path / "teacher0.npy", ns=(before.st_atime_ns, before.st_mtime_ns))  # not a matter of dates
    with pytest.raises(JobError, match=r"different job \(the inputs changed: teacher 't0' in chunk \[0\]\)"):
        estimate_manifest(manifest, out, "sd", progress=False)
    np.save(tmp_path / "teacher0.npy", arr)  # the same values again, at a new date: the same job
    assert estimate_manifest(manifest, out, "sd", progress=False).status == "already complete"


def test_partial_job_needs_resume_and_same_settings(tmp_path):
    manifest, _ = make_job(tmp_path, batch=200)
    out = tmp_path / "soft.npy"
    proc = run_cli(
        ["estimate", str(manifest), "--out", str(out), "--method", "sd", "--chunk-size", "50"],
        env={"_UHC_FAST_KILL": "1:after-record"},
    )
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and not (tmp_path / "soft.json").exists()
    with pytest.raises(JobError, match="interrupted job; pass --resume"):
        estimate_manifest(manifest, out, "sd", chunk_size=50, progress=False)
    with pytest.raises(JobError, match=r"different settings or teachers \(differs in \['method'\]\)"):
        estimate_manifest(manifest, out, "ce", chunk_size=50, resume=True, progress=False)
    with pytest.raises(JobError, match="chunk_size=50"):
        estimate_manifest(manifest, out, "sd", chunk_size=64, resume=True, progress=False)
    result = estimate_manifest(manifest, out, "sd", resume=True, progress=False)  # keeps chunk_size=50
    assert (result.chunks_before, result.chunks_run, result.chunks_total) == (2, 2, 4)
    np.testing.assert_array_equal(np.load(out), chunked_reference(manifest, "sd", 50).astype(np.float32))


def test_resume_keeps_the_backend_the_job_started_with(tmp_path):
    manifest, _ = make_job(tmp_path, batch=100)
    out = tmp_path / "soft.npy"
    proc = run_cli(
        ["estimate", str(manifest), "--out", str(out), "--method", "sd", "--chunk-size", "50"],
        env={"_UHC_FAST_KILL": "0:after-record"},
    )
    assert proc.returncode == -signal.SIGKILL
    job_file = tmp_path / "soft.npy.partial" / "job.json"
    job = json.loads(job_file.read_text())
    assert job["backend"] in ("torch", "cpu")  # "auto", resolved once for the whole job
    job["backend"] = "cuda"  # as if started on a GPU machine
    job_file.write_text(json.dumps(job))
    with pytest.raises(JobError, match="started with backend 'cuda', which cannot run here"):
        estimate_manifest(manifest, out, "sd", resume=True, progress=False)


@pytest.fixture(scope="module")
def killable_job(tmp_path_factory):
    """A ce job and its uninterrupted result (computed in this process, like the resumes below)."""
    folder = tmp_path_factory.mktemp("killable")
    manifest, _ = make_job(folder, batch=250, noise=0.2)
    # backend="torch" pins the arithmetic even while compiled backends are rebuilt next to the tests.
    estimate_manifest(manifest, folder / "whole.npy", "ce", chunk_size=60, backend="torch", progress=False)
    return manifest, (folder / "whole.npy").read_bytes()


@pytest.mark.parametrize("phase", ["mid-write", "after-write", "after-record", "before-sidecar"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, killable_job, phase):
    manifest, whole = killable_job
    out = tmp_path / "killed.npy"
    chunk = "*" if phase == "before-sidecar" else "2"
    killed = run_cli(
        ["estimate", str(manifest), "--method", "ce", "--chunk-size", "60", "--backend", "torch", "--out", str(out)],
        env={"_UHC_FAST_KILL": f"{chunk}:{phase}"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "killed.json").exists()  # no sidecar: not complete
    if phase != "before-sidecar":
        assert not out.exists()
    else:
        assert (tmp_path / "killed.npy.partial" / "job.json").exists()
    with pytest.raises(JobError, match="pass --resume"):
        estimate_manifest(manifest, out, "ce", backend="torch", progress=False)
    result = estimate_manifest(manifest, out, "ce", backend="torch", resume=True, progress=False)
    assert result.status == "complete"
    assert out.read_bytes() == whole
    side = json.loads((tmp_path / "killed.json").read_text())
    assert side["status"] == "complete" and len(side["chunks"]) == 5
    assert not (tmp_path / "killed.npy.partial").exists()


def test_sigkill_at_an_arbitrary_moment_then_resume(tmp_path):
    manifest, _ = make_job(tmp_path, batch=400)
    args = ["estimate", str(manifest), "--method", "sd", "--chunk-size", "20", "--no-progress", "--backend", "torch"]
    estimate_manifest(manifest, tmp_path / "whole.npy", "sd", chunk_size=20, backend="torch", progress=False)
    out = tmp_path / "soft.npy"
    env = {**os.environ, "PYTHONPATH": str(REPO), "_UHC_FAST_SLEEP": "0.05"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uhc_fast.commands", *args, "--out", str(out)], env=env, stderr=subprocess.DEVNULL
    )
    chunks = tmp_path / "soft.npy.partial" / "chunks"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(chunks.glob("*.json"))) < 3:
        time.sleep(0.01)
    time.sleep(0.037)  # land somewhere inside a later chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    result = estimate_manifest(manifest, out, "sd", backend="torch", resume=True, progress=False)
    assert 3 <= result.chunks_before < result.chunks_total == 20
    assert out.read_bytes() == (tmp_path / "whole.npy").read_bytes()


# ---------------------------------------------------------------------- bounded memory
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from uhc_fast.stream import estimate_manifest
    small, big, out_small, out_big, chunk = sys.argv[1:6]
    # Warm up on a small job: imports, allocator pools and thread pools are then in the baseline.
    estimate_manifest(small, out_small, "sd", chunk_size=int(chunk), progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    estimate_manifest(big, out_big, "sd", chunk_size=int(chunk), progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_peak_memory_is_bounded_by_the_chunk_not_the_job(tmp_path):
    # 4 teachers x 50 classes over 100k samples: 80 MB of inputs and 74 MB (K=185 float32) of output,
    # streamed through 2048-sample chunks (~3.2 MB of inputs and outputs each).
    rng = np.random.default_rng(0)
    batch, per = 100_000, 50
    sets = [list(range(i * 45, i * 45 + per)) for i in range(4)]  # overlapping by 5: connected
    k = max(max(s) for s in sets) + 1
    teachers = []
    for i, cs in enumerate(sets):
        arr = np.lib.format.open_memmap(tmp_path / f"big{i}.npy", mode="w+", dtype=np.float32, shape=(batch, per))
        for start in range(0, batch, 10_000):
            x = rng.random((min(10_000, batch - start), per), dtype=np.float32) + 0.1
            arr[start : start + len(x)] = x / x.sum(1, keepdims=True)
        arr.flush()
        del arr
        teachers.append({"classes": cs, "outputs": f"big{i}.npy", "kind": "probs"})
    (tmp_path / "big.json").write_text(json.dumps({"teachers": teachers}))
    small = {"teachers": [{**t, "outputs": f"small{i}.npy"} for i, t in enumerate(teachers)]}
    for i in range(4):
        np.save(tmp_path / f"small{i}.npy", np.load(tmp_path / f"big{i}.npy", mmap_mode="r")[:4096])
    (tmp_path / "small.json").write_text(json.dumps(small))
    input_bytes = 4 * batch * per * 4
    output_bytes = batch * k * 4
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEMORY_SCRIPT,
            str(tmp_path / "small.json"),
            str(tmp_path / "big.json"),
            str(tmp_path / "s.npy"),
            str(tmp_path / "b.npy"),
            "2048",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (rss["after_kib"] - rss["before_kib"]) * 1024
    # Holding the inputs or the outputs would grow the peak by >= 80 MB; the stream may grow it by
    # a few chunks' worth only.
    assert growth < 16 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB for {input_bytes + output_bytes} bytes"
    assert np.load(tmp_path / "b.npy", mmap_mode="r").shape == (batch, k)
