"""Streaming jobs against each other and against their inputs: the output lock, resuming after the
inputs were fixed or changed, and each rank's device."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from uhc_fast import InputError
from uhc_fast.stream import JobError, estimate_manifest
from uhc_fast.stream.group import Group

from .test_stream import REPO, chunked_reference, make_job, run_cli


def start_held_job(args: list[str], gate) -> subprocess.Popen:
    """``uhc-fast ARGS`` in a new process that finishes its first chunk, then waits until ``gate``
    exists; returns once the process holds the output lock."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "_UHC_FAST_HOLD": str(gate)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uhc_fast.commands", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    out = args[args.index("--out") + 1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(Path(out + ".lock").read_text())["pid"] == proc.pid:
                return proc
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"the job did not take its lock: {proc.communicate()[1][-2000:]}")


# ---------------------------------------------------------------------- the output lock
def test_a_second_run_is_refused_while_a_job_writes_the_output(tmp_path):
    manifest, _ = make_job(tmp_path, batch=200)
    out = tmp_path / "soft.npy"
    args = ["estimate", str(manifest), "--out", str(out), "--method", "sd", "--chunk-size", "50", "--force"]
    first = start_held_job(args, tmp_path / "go")
    try:
        record = json.loads((tmp_path / "soft.npy.lock").read_text())
        assert record["host"] == socket.gethostname() and "estimate" in record["command"] and record["started"]
        # The case: the same --force command again, a moment later.
        second = run_cli(args)
        assert second.returncode == 2
        running = f"is being written by a running job (pid {first.pid} on host {socket.gethostname()!r} since "
        assert running in second.stderr and "pass --wait" in second.stderr
        # The first job's partial folder is not mistaken for an interrupted job.
        assert (tmp_path / "soft.npy.partial" / "chunks" / "00000000.json").exists()
        for resume in (False, True):
            with pytest.raises(JobError, match=rf"running job \(pid {first.pid} ") as info:
                estimate_manifest(manifest, out, "sd", chunk_size=50, resume=resume, progress=False)
            assert "interrupted" not in str(info.value)
    finally:
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    np.testing.assert_array_equal(np.load(out), chunked_reference(manifest, "sd", 50).astype(np.float32))
    assert json.loads((tmp_path / "soft.json").read_text())["status"] == "complete"
    assert not (tmp_path / "soft.npy.lock").exists()


def test_wait_for_the_running_job(tmp_path, caplog):
    manifest, _ = make_job(tmp_path, batch=200)
    out = tmp_path / "soft.npy"
    first = start_held_job(
        ["estimate", str(manifest), "--out", str(out), "--method", "sd", "--chunk-size", "50"], tmp_path / "go"
    )
    outcome = {}

    def second():
        try:
            outcome["result"] = estimate_manifest(manifest, out, "sd", wait=True, progress=False)
        except Exception as err:
            outcome["error"] = err

    waiter = threading.Thread(target=second)
    with caplog.at_level(logging.WARNING, logger="uhc_fast.stream"):
        waiter.start()
        time.sleep(0.5)
        try:
            assert waiter.is_alive() and not outcome  # waiting on the lock
        finally:
            (tmp_path / "go").touch()
            first.communicate(timeout=120)
            waiter.join(timeout=120)
    assert first.returncode == 0
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].status == "already complete"  # it waited for the first job to finish
    assert f"waiting for the job writing {out} to finish (pid {first.pid} " in caplog.text


def test_a_lock_left_by_a_dead_job_blocks_nothing(tmp_path):
    manifest, _ = make_job(tmp_path, batch=200)
    out = tmp_path / "soft.npy"
    killed = run_cli(
        ["estimate", str(manifest), "--out", str(out), "--method", "sd", "--chunk-size", "50"],
        env={"_UHC_FAST_KILL": "1:after-record"},
    )
    assert killed.returncode == -signal.SIGKILL
    record = json.loads((tmp_path / "soft.npy.lock").read_text())  # the dead job's record is still there
    assert record["pid"] != os.getpid()
    result = estimate_manifest(manifest, out, "sd", resume=True, progress=False)
    assert (result.status, result.chunks_before) == ("complete", 2)
    assert not (tmp_path / "soft.npy.lock").exists()
    (tmp_path / "other.npy.lock").write_text("not even JSON")
    assert estimate_manifest(manifest, tmp_path / "other.npy", "sd", progress=False).status == "complete"
    assert not (tmp_path / "other.npy.lock").exists()


# ---------------------------------------------------------------------- resume after the inputs changed
def test_resume_after_fixing_a_bad_value_keeps_the_finished_chunks(tmp_path):
    manifest, _ = make_job(tmp_path, batch=200, noise=0.2)
    good = np.load(tmp_path / "teacher2.npy")
    bad = good.copy()
    bad[137, 1] = np.nan
    np.save(tmp_path / "teacher2.npy", bad)
    out = tmp_path / "soft.npy"
    with pytest.raises(ValueError, match=r"^teacher 2 \('t2'\), sample 137: outputs contain NaN or Inf$") as info:
        estimate_manifest(manifest, out, "ce", chunk_size=50, progress=False)
    assert isinstance(info.value, InputError) and (info.value.teacher, info.value.row) == (2, 137)
    chunks = tmp_path / "soft.npy.partial" / "chunks"
    kept = {p.name: json.loads(p.read_text()) for p in chunks.glob("*.json")}
    assert sorted(kept) == ["00000000.json", "00000001.json"]
    np.save(tmp_path / "teacher2.npy", good)  # fixed: every byte of the file rewritten, a new date
    with pytest.raises(JobError, match="interrupted job; pass --resume"):
        estimate_manifest(manifest, out, "ce", chunk_size=50, progress=False)
    result = estimate_manifest(manifest, out, "ce", resume=True, progress=False)
    assert (result.status, result.chunks_total, result.chunks_before) == ("complete", 4, 2)
    assert (result.chunks_run, result.chunks_changed) == (2, 0)
    side = json.loads((tmp_path / "soft.json").read_text())
    assert side["chunks"][:2] == [kept["00000000.json"], kept["00000001.json"]]  # kept, not recomputed
    estimate_manifest(manifest, tmp_path / "clean.npy", "ce", chunk_size=50, progress=False)
    assert out.read_bytes() == (tmp_path / "clean.npy").read_bytes()


def test_resume_recomputes_the_finished_chunks_whose_inputs_changed(tmp_path, caplog):
    manifest, _ = make_job(tmp_path, batch=200, noise=0.2)
    before = np.load(tmp_path / "teacher0.npy")
    bad = before.copy()
    bad[160, 0] = np.inf  # chunk 3: chunks 0-2 finish first
    np.save(tmp_path / "teacher0.npy", bad)
    out = tmp_path / "soft.npy"
    with pytest.raises(ValueError, match=r"teacher 0 \('t0'\), sample 160"):
        estimate_manifest(manifest, out, "mf-p", chunk_size=50, progress=False)
    chunks = tmp_path / "soft.npy.partial" / "chunks"
    old = {p.name: json.loads(p.read_text()) for p in chunks.glob("*.json")}
    assert sorted(old) == ["00000000.json", "00000001.json", "00000002.json"]
    after = before.copy()
    after[60] = after[60, ::-1]  # chunk 1 now reads other (valid) values
    np.save(tmp_path / "teacher0.npy", after)
    with caplog.at_level(logging.WARNING, logger="uhc_fast.stream"):
        result = estimate_manifest(manifest, out, "mf-p", resume=True, progress=False)
    assert "recomputing finished chunks whose inputs changed: teacher 't0' in chunk [1]" in caplog.text
    assert (result.chunks_before, result.chunks_changed, result.chunks_run) == (2, 1, 2)
    side = json.loads((tmp_path / "soft.json").read_text())["chunks"]
    assert side[0] == old["00000000.json"] and side[2] == old["00000002.json"]
    assert side[1]["checksums"]["t0"] != old["00000001.json"]["checksums"]["t0"]
    assert side[1]["checksums"]["t1"] == old["00000001.json"]["checksums"]["t1"]
    estimate_manifest(manifest, tmp_path / "clean.npy", "mf-p", chunk_size=50, progress=False)
    assert out.read_bytes() == (tmp_path / "clean.npy").read_bytes()


# ---------------------------------------------------------------------- devices
def test_torchrun_ranks_compute_on_their_local_gpu(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    rank = Group(rank=7, world_size=8)
    assert rank.device(torch.device("cuda")) == torch.device("cuda", 1)  # LOCAL_RANK modulo the GPUs
    assert rank.device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit GPU is kept
    assert made_current == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert rank.device(torch.device("cpu")) == torch.device("cpu")
    assert Group().device(torch.device("cuda")) == torch.device("cuda")  # one process: as given
    assert len(made_current) == 2  # neither changes the current CUDA device
