"""Two processes under torchrun (gloo, CPU) give the same bytes as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed as dist

from uhc_fast.stream import estimate_manifest
from uhc_fast.stream.lock import OutputLock

from .test_stream import REPO, make_job, run_cli

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m uhc_fast.commands ARGS``."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "uhc_fast.commands",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_match_one_process(tmp_path):
    manifest, _ = make_job(tmp_path, batch=310, noise=0.2)
    single = estimate_manifest(manifest, tmp_path / "one.npy", "ce", chunk_size=40, progress=False)
    assert single.world_size == 1
    proc = torchrun(
        [
            "estimate",
            str(manifest),
            "--method",
            "ce",
            "--chunk-size",
            "40",
            "--no-progress",
            "--out",
            str(tmp_path / "two.npy"),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 chunks on 2 ranks" in proc.stderr
    assert (tmp_path / "two.npy").read_bytes() == (tmp_path / "one.npy").read_bytes()
    side = json.loads((tmp_path / "two.json").read_text())
    assert side["status"] == "complete" and side["world_size"] == 2
    # Each rank took one contiguous range of chunks.
    assert [c["rank"] for c in side["chunks"]] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not (tmp_path / "two.npy.partial").exists() and not (tmp_path / "two.npy.lock").exists()


def test_every_rank_stops_while_another_job_writes_the_output(tmp_path):
    manifest, _ = make_job(tmp_path, batch=100)
    lock = OutputLock(tmp_path / "soft.npy.lock")  # held by this process, as by a running job
    lock.acquire()
    try:
        proc = torchrun(
            ["estimate", str(manifest), "--method", "sd", "--no-progress", "--out", str(tmp_path / "soft.npy")]
        )
    finally:
        lock.release()
    assert proc.returncode != 0
    running = f"is being written by a running job (pid {os.getpid()} "
    assert f"uhc-fast estimate: error: {tmp_path / 'soft.npy'} {running}" in proc.stderr  # rank 0
    assert f"uhc-fast estimate: error: rank 0: JobError: {tmp_path / 'soft.npy'} {running}" in proc.stderr  # rank 1
    assert not (tmp_path / "soft.npy.partial").exists() and not (tmp_path / "soft.npy").exists()


@pytest.mark.slow
def test_two_ranks_resume_a_killed_single_process_job(tmp_path):
    manifest, _ = make_job(tmp_path, batch=200)
    estimate_manifest(manifest, tmp_path / "one.npy", "mf-p", chunk_size=25, progress=False)
    args = [
        "estimate",
        str(manifest),
        "--method",
        "mf-p",
        "--chunk-size",
        "25",
        "--no-progress",
        "--out",
        str(tmp_path / "two.npy"),
    ]
    killed = run_cli(args, env={"_UHC_FAST_KILL": "2:after-record"})
    assert killed.returncode == -signal.SIGKILL
    proc = torchrun([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two.npy").read_bytes() == (tmp_path / "one.npy").read_bytes()
    side = json.loads((tmp_path / "two.json").read_text())
    # Chunks 0-2 came from the killed run (rank 0 of 1); the 5 pending ones were split 2 / 3.
    assert [c["rank"] for c in side["chunks"]] == [0, 0, 0, 0, 0, 1, 1, 1]


@pytest.mark.slow
def test_a_failing_rank_fails_every_rank_and_keeps_finished_chunks(tmp_path):
    manifest, _ = make_job(tmp_path, batch=160)
    arr = np.load(tmp_path / "teacher1.npy")
    arr[150, 0] = np.inf  # in the last chunk: rank 1's share
    np.save(tmp_path / "teacher1.npy", arr)
    proc = torchrun(
        [
            "estimate",
            str(manifest),
            "--method",
            "sd",
            "--chunk-size",
            "40",
            "--no-progress",
            "--out",
            str(tmp_path / "soft.npy"),
        ]
    )
    assert proc.returncode != 0
    assert "teacher 1 ('t1'), sample 150: outputs contain NaN or Inf" in proc.stderr
    assert not (tmp_path / "soft.npy").exists()
    done = sorted(p.name for p in (tmp_path / "soft.npy.partial" / "chunks").glob("*.json"))
    assert done == ["00000000.json", "00000001.json", "00000002.json"]
