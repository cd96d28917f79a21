"""Out-of-core estimation: teacher outputs on disk -> soft labels on disk, in fixed chunks.

:func:`estimate_manifest` reads a :mod:`manifest <uhc_fast.manifest>`, splits the B samples into
chunks of ``chunk_size`` rows (chunk ``k`` is rows ``[k * chunk_size, (k + 1) * chunk_size)``,
whatever the number of processes), solves each chunk with :func:`uhc_fast.estimate` and writes
its rows into a ``(B, K)`` ``.npy`` file with positioned writes. Memory is bounded by the chunk
size, never by B.

Files, for ``out = "soft.npy"``:

- ``soft.npy.partial/`` while the job runs: ``data.npy`` (and ``indices.npy`` for top-k output),
  ``job.json`` (the job's fingerprint and chunk size) and ``chunks/NNNNNNNN.json``, one record per
  finished chunk, written atomically only after the chunk's rows are on disk (fsync).
- ``soft.npy`` (``soft.indices.npy``) and ``soft.json`` (the sidecar: class names, method,
  parameters, per-chunk diagnostics, ``"status": "complete"``) once every chunk is done. The data
  file is renamed into place only when complete, so a ``soft.npy`` is never partial.

A job killed at any point (SIGKILL included) is finished by the same call with ``resume=True``;
the chunks recorded are kept, the others are recomputed, and because chunk boundaries are fixed
the result is bit-identical to an uninterrupted run. Under ``torchrun`` (``torch.distributed``
initialised, or ``WORLD_SIZE`` > 1 in the environment), rank 0 prepares the files, the pending
chunks are split into contiguous ranges, one per rank, every rank writes its own rows, and rank 0
finalises: the result is identical to a single-process run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__, dispatch
from .api import ITERATIVE, METHODS, check_method, estimate
from .inputs import check_values
from .manifest import Manifest, load_manifest
from .progress import Progress

log = logging.getLogger(__name__)

FORMAT = "uhc_fast.soft_labels/1"
OUT_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "float64": np.dtype("<f8")}
# Default chunk: about this many stored elements (teacher outputs + soft labels) per chunk.
_CHUNK_ELEMENTS = 1 << 24
_INDEX_DTYPE = np.dtype("<i4")
# Test-only fault injection: "CHUNK:PHASE" (or "*:PHASE") makes the process SIGKILL itself there.
_KILL_ENV = "_UHC_FAST_KILL"
_SLEEP_ENV = "_UHC_FAST_SLEEP"  # test-only: seconds to sleep after each chunk


class JobError(RuntimeError):
    """The job cannot start or finish as asked (existing outputs, a different job to resume, a failed rank)."""


@dataclass(frozen=True)
class JobResult:
    """What one call of :func:`estimate_manifest` did.

    Attributes:
        status: ``"complete"`` (this call finished the job) or ``"already complete"``.
        out, sidecar, indices: the result's files (``indices`` only for top-k output).
        chunks_total: chunks in the job; chunks_before: already done when the call started;
        chunks_run / samples_run: done by this process in this call.
        seconds: wall time of this call. rank / world_size: this process in the job.
    """

    status: str
    out: Path
    sidecar: Path
    indices: Path | None
    chunks_total: int
    chunks_before: int
    chunks_run: int
    samples_run: int
    seconds: float
    rank: int = 0
    world_size: int = 1


def output_paths(out: str | os.PathLike, top_k: int | None = None) -> dict[str, Path | None]:
    """The files a job writes for ``out``: values, indices, sidecar and the partial folder."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"out={str(out)!r}: the output must be a .npy path")
    return {
        "values": out,
        "indices": out.with_name(out.stem + ".indices.npy") if top_k else None,
        "sidecar": out.with_suffix(".json"),
        "partial": out.with_name(out.name + ".partial"),
    }


def default_chunk_size(manifest: Manifest) -> int:
    """Rows per chunk when none is given: ~16M stored elements, between 256 and 65536 rows."""
    per_row = sum(t.shape[1] for t in manifest.teachers) + manifest.num_classes
    return int(min(65536, max(256, _CHUNK_ELEMENTS // per_row)))


def estimate_manifest(
    manifest: str | os.PathLike | Manifest,
    out: str | os.PathLike,
    method: str = "ce",
    *,
    chunk_size: int | None = None,
    dtype: str = "float32",
    top_k: int | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    eps: float = 1e-12,
    backend: str = "auto",
    device: str | torch.device | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
) -> JobResult:
    """Estimate soft labels for every sample of a manifest, streaming, into ``out`` (a ``.npy``).

    Args:
        manifest: a manifest path or a loaded :class:`~uhc_fast.manifest.Manifest`.
        out: the ``(B, K)`` output ``.npy`` (``(B, top_k)`` values with ``top_k``); the sidecar is
            ``out`` with suffix ``.json``, top-k class indices go to ``<stem>.indices.npy``.
        method: as in :func:`uhc_fast.estimate`.
        chunk_size: samples per chunk (default: :func:`default_chunk_size`). Fixed for the job: a
            resumed job keeps the chunk size it started with.
        dtype: stored soft-label dtype, ``"float32"``, ``"float16"`` or ``"float64"``.
        top_k: keep only the ``top_k`` largest soft labels per sample (values sorted descending,
            int32 class indices beside them).
        temperature, alpha, tol, max_iter, eps, backend: passed to :func:`uhc_fast.estimate`.
        device: where to compute (default: CUDA when available, else CPU). On CUDA the next
            chunk is read into pinned memory and copied on a side stream while this one computes.
        resume: finish an interrupted job (chunks already on disk are kept).
        force: delete this job's existing outputs and start over.
        progress: show a progress bar on stderr (``None``: only when stderr is a terminal).

    Returns:
        A :class:`JobResult`. Re-running a finished job (same manifest files and parameters) does
        nothing and returns ``status="already complete"`` unless ``force``.

    Raises:
        ManifestError, ValueError: bad manifest, inputs or parameters, before any work starts.
        JobError: existing outputs without ``resume``/``force``, or a different job to resume.
    """
    started = time.perf_counter()
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    check_method(method)
    params = _check_params(m, method, chunk_size, dtype, top_k, temperature, alpha, tol, max_iter, eps, backend)
    dev = _resolve_device(device)
    dispatch.select(backend, dev, method)  # a forced backend that cannot run here fails now
    paths = output_paths(out, top_k)
    params["device"] = dev.type
    fingerprint = _fingerprint(m, method, params)

    group = _Group.from_env()
    try:
        if dev.type == "cuda" and dev.index is None and group.world_size > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", group.rank)) % torch.cuda.device_count())
        plan = group.on_rank0(lambda: _prepare(m, paths, method, params, fingerprint, chunk_size, resume, force, dev))
        result_args = dict(
            out=paths["values"],
            sidecar=paths["sidecar"],
            indices=paths["indices"],
            chunks_total=plan["chunks_total"],
            chunks_before=plan["chunks_total"] - len(plan["pending"]),
            rank=group.rank,
            world_size=group.world_size,
        )
        if plan["status"] == "already complete":
            return JobResult(
                "already complete", chunks_run=0, samples_run=0, seconds=time.perf_counter() - started, **result_args
            )

        pending = plan["pending"]
        mine = pending[
            group.rank * len(pending) // group.world_size : (group.rank + 1) * len(pending) // group.world_size
        ]
        size = plan["chunk_size"]
        error = None
        samples = 0
        try:
            samples = _run_chunks(m, paths, method, params, size, mine, dev, group, progress, plan)
        except Exception as err:
            error = err
        errors = group.gather(None if error is None else f"rank {group.rank}: {type(error).__name__}: {error}")
        failed = [e for e in errors if e is not None]
        if error is not None:
            raise error
        if failed:
            raise JobError("; ".join(failed) + " (finished chunks are kept: run again with --resume)")
        group.on_rank0(lambda: _finalise(m, paths, method, params, fingerprint, size, plan, group.world_size))
        return JobResult(
            "complete", chunks_run=len(mine), samples_run=samples, seconds=time.perf_counter() - started, **result_args
        )
    finally:
        group.close()
        if not isinstance(manifest, Manifest):
            m.close()


# ---------------------------------------------------------------------- parameters and identity
def _check_params(m, method, chunk_size, dtype, top_k, temperature, alpha, tol, max_iter, eps, backend) -> dict:
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {tuple(OUT_DTYPES)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: must be an int >= 1")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= m.num_classes):
        raise ValueError(f"top_k={top_k!r}: must be an int between 1 and K={m.num_classes}")
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature}: must be finite and > 0")
    if alpha is not None and not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha={alpha}: must be finite and >= 0")
    if tol is not None and not (tol > 0):
        raise ValueError(f"tol={tol}: must be > 0")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0):
        raise ValueError(f"max_iter={max_iter!r}: must be an int >= 0")
    if not (eps > 0):
        raise ValueError(f"eps={eps}: must be > 0")
    dispatch.check_backend_name(backend)
    return {
        "dtype": dtype,
        "top_k": top_k,
        "temperature": temperature,
        "alpha": None if alpha is None else float(alpha),
        "tol": None if tol is None else float(tol),
        "max_iter": max_iter,
        "eps": float(eps),
        "backend": backend,
    }


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={str(device)!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available in this process")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}: expected cpu or cuda")
    return dev


def _fingerprint(m: Manifest, method: str, params: dict) -> dict:
    """Everything the stored result depends on, except the chunk size (kept by the job itself)."""
    return {
        "format": FORMAT,
        "manifest": m.digest,
        "method": method,
        "num_samples": m.num_samples,
        "num_classes": m.num_classes,
        **params,
    }


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ---------------------------------------------------------------------- files
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj, durable: bool = True) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform/file system
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_npy(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> None:
    """An all-zero ``.npy`` of ``shape`` (sparse where the file system allows)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    arr.flush()
    del arr


def _npy_offset(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> int:
    """Byte offset of the data in one of our ``.npy`` files, checking its header matches."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = reader(f)
        offset = f.tell()
    if tuple(got_shape) != tuple(shape) or got_dtype != dtype or fortran:
        raise JobError(f"{path}: holds {got_dtype} {tuple(got_shape)}, expected {dtype} {tuple(shape)}; use --force")
    if path.stat().st_size < offset + int(np.prod(shape)) * dtype.itemsize:
        raise JobError(f"{path}: shorter than its header says; use --force to start over")
    return offset


def _shapes(m: Manifest, params: dict) -> dict[str, tuple[np.dtype, tuple[int, int]]]:
    width = params["top_k"] or m.num_classes
    shapes = {"values": (OUT_DTYPES[params["dtype"]], (m.num_samples, width))}
    if params["top_k"]:
        shapes["indices"] = (_INDEX_DTYPE, (m.num_samples, width))
    return shapes


def _chunk_record_path(paths: dict, k: int) -> Path:
    return paths["partial"] / "chunks" / f"{k:08d}.json"


def _done_chunks(paths: dict, count: int, chunk_size: int, num_samples: int) -> dict[int, dict]:
    done = {}
    folder = paths["partial"] / "chunks"
    if not folder.is_dir():
        return done
    for file in folder.glob("*.json"):
        rec = _read_json(file)
        if not isinstance(rec, dict) or not isinstance(rec.get("chunk"), int):
            continue
        k = rec["chunk"]
        if (
            0 <= k < count
            and rec.get("start") == k * chunk_size
            and rec.get("stop") == min(num_samples, (k + 1) * chunk_size)
        ):
            done[k] = rec
    return done


def _remove_outputs(paths: dict) -> None:
    for key in ("values", "indices", "sidecar"):
        if paths.get(key) is not None and paths[key].exists():
            paths[key].unlink()
    if paths["partial"].exists():
        shutil.rmtree(paths["partial"])


def _prepare(m, paths, method, params, fingerprint, chunk_size, resume, force, device) -> dict:
    """Rank 0: decide what to do with existing files, create the partial job, list pending chunks.

    ``backend="auto"`` is resolved here, once, and kept by the job: every rank and every resume
    then runs the same backend, so the result does not depend on where each chunk ran.
    """
    values, partial = paths["values"], paths["partial"]
    finals = [p for p in (values, paths["indices"], paths["sidecar"]) if p is not None and p.exists()]
    if force:
        _remove_outputs(paths)
        finals = []
    job = _read_json(partial / "job.json") if partial.is_dir() else None
    job = job if isinstance(job, dict) else None
    if finals:
        side = _read_json(paths["sidecar"])
        ours = isinstance(side, dict) and side.get("format") == FORMAT
        if ours and side.get("status") == "complete" and side.get("fingerprint") == fingerprint and values.exists():
            size = side.get("parameters", {}).get("chunk_size", 1)
            total = -(-m.num_samples // size)
            return {"status": "already complete", "chunks_total": total, "pending": []}
        # A job killed between moving its data into place and writing its sidecar: --resume finishes it.
        renamed = job is not None and not (partial / "data.npy").exists()
        if not renamed:
            if ours and side.get("fingerprint") is not None:
                diff = _differences(side["fingerprint"], fingerprint)
                raise JobError(
                    f"{values} holds the result of a different job (differs in {diff}); pass --force to overwrite it"
                )
            raise JobError(f"{finals[0]} already exists; pass --force to overwrite it")
    if job is not None and not force:
        if not resume:
            raise JobError(f"{partial} holds an interrupted job; pass --resume to finish it or --force to start over")
        if job.get("fingerprint") != fingerprint:
            diff = _differences(job.get("fingerprint") or {}, fingerprint)
            raise JobError(
                f"cannot resume {partial}: it was started with different inputs or settings "
                f"(differs in {diff}); pass --force to start over"
            )
        size = job.get("chunk_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise JobError(f"{partial / 'job.json'} is damaged (chunk_size={size!r}); pass --force to start over")
        if chunk_size is not None and chunk_size != size:
            raise JobError(
                f"cannot resume with chunk_size={chunk_size}: the job was started with "
                f"chunk_size={size} (omit it to keep that one)"
            )
        backend = job.get("backend")
        try:
            dispatch.select(backend, device, method)
        except (RuntimeError, ValueError) as err:
            raise JobError(
                f"cannot resume {partial}: it was started with backend {backend!r}, which cannot run here ({err}); "
                "its results would differ in rounding: resume where it can run, or pass --force to start over"
            ) from None
        if (partial / "data.npy").exists():
            for key, (dt, shape) in _shapes(m, params).items():
                _npy_offset(partial / f"{key if key == 'indices' else 'data'}.npy", dt, shape)
    else:
        # A fresh job (or a partial folder whose job.json was never written: nothing in it counts).
        if partial.exists():
            shutil.rmtree(partial)
        size = chunk_size or default_chunk_size(m)
        backend = dispatch.select(params["backend"], device, method).name
        values.parent.mkdir(parents=True, exist_ok=True)
        (partial / "chunks").mkdir(parents=True)
        for key, (dt, shape) in _shapes(m, params).items():
            _create_npy(partial / f"{key if key == 'indices' else 'data'}.npy", dt, shape)
        _write_json_atomic(
            partial / "job.json",
            {
                "fingerprint": fingerprint,
                "chunk_size": size,
                "backend": backend,
                "method": method,
                "started": _now(),
                "manifest": str(m.path.resolve()) if m.path else None,
            },
        )
        _fsync_dir(partial)
    total = -(-m.num_samples // size)
    done = _done_chunks(paths, total, size, m.num_samples)
    pending = [k for k in range(total) if k not in done]
    if done:
        log.info("resuming %s: %d of %d chunks already done", values, len(done), total)
    return {"status": "run", "chunk_size": size, "backend": backend, "chunks_total": total, "pending": pending}


def _finalise(m, paths, method, params, fingerprint, size, plan, world_size) -> None:
    """Rank 0, after every rank finished: check every chunk, move the data into place, write the sidecar."""
    total = plan["chunks_total"]
    done = _done_chunks(paths, total, size, m.num_samples)
    missing = [k for k in range(total) if k not in done]
    if missing:
        raise JobError(f"chunks {missing[:10]} have no completion record; run again with --resume")
    partial = paths["partial"]
    # Indices first, values last: a values file in place means everything before it is too.
    for key in ("indices", "values"):
        if paths[key] is None:
            continue
        src = partial / ("indices.npy" if key == "indices" else "data.npy")
        if src.exists():
            os.replace(src, paths[key])
    _fsync_dir(paths["values"].parent)
    _maybe_die("*", "before-sidecar")
    records = [done[k] for k in range(total)]
    job = _read_json(partial / "job.json") or {}
    side = {
        "format": FORMAT,
        "status": "complete",
        "fingerprint": fingerprint,
        "classes": list(m.class_names),
        "method": method,
        "shape": [m.num_samples, params["top_k"] or m.num_classes],
        "num_classes": m.num_classes,
        "dtype": params["dtype"],
        "files": {"values": paths["values"].name, "indices": paths["indices"].name if paths["indices"] else None},
        "parameters": {**params, "chunk_size": size},
        "manifest": {"path": str(m.path.resolve()) if m.path else None, "digest": m.digest},
        "teachers": [
            {"name": t.name, "kind": t.kind, "weight": t.weight, "classes": len(t.classes), "outputs": str(t.path)}
            for t in m.teachers
        ],
        "summary": _summary(records, m.num_samples),
        "chunks": records,
        "world_size": world_size,
        "started": job.get("started"),
        "finished": _now(),
        "versions": {"uhc_fast": __version__, "torch": torch.__version__, "numpy": np.__version__},
    }
    _write_json_atomic(paths["sidecar"], side)
    _fsync_dir(paths["sidecar"].parent)
    shutil.rmtree(partial)


def _summary(records: list[dict], num_samples: int) -> dict:
    summary = {
        "samples": num_samples,
        "chunks": len(records),
        "backends": sorted({r["backend"] for r in records}),
        "compute_seconds": round(sum(r["seconds"] for r in records), 6),
    }
    if records and "not_converged" in records[0]:
        summary["not_converged"] = sum(r["not_converged"] for r in records)
        summary["max_residual"] = max(r["residual_max"] for r in records)
        summary["max_iterations"] = max(r["iterations_max"] for r in records)
        summary["mean_iterations"] = sum(r["iterations_mean"] * (r["stop"] - r["start"]) for r in records) / max(
            1, num_samples
        )
    return summary


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _maybe_die(chunk, phase: str) -> None:
    """Test-only fault injection (see ``_KILL_ENV``): die exactly like ``kill -9`` would."""
    want = os.environ.get(_KILL_ENV)
    if want and want == f"{chunk}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------- the work
class _Reader:
    """Reads chunks ahead on one thread; on CUDA into pinned memory, copied on a side stream."""

    def __init__(self, m: Manifest, chunk_size: int, device: torch.device) -> None:
        self.m = m
        self.device = device
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="uhc-read")
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            # Two slots: chunk j+1 is read and copied while chunk j computes; slot j%2 is reused by
            # chunk j+2 only after chunk j finished (its results were copied back synchronously).
            self.pinned = [
                [torch.empty((chunk_size, t.row_bytes), dtype=torch.uint8).pin_memory().numpy() for t in m.teachers]
                for _ in range(2)
            ]

    def submit(self, slot: int, start: int, stop: int) -> concurrent.futures.Future:
        return self.pool.submit(self._load, slot, start, stop)

    def _load(self, slot: int, start: int, stop: int):
        if not self.cuda:
            return [t.read(start, stop) for t in self.m.teachers], None
        host = [t.read(start, stop, out=self.pinned[slot][i]) for i, t in enumerate(self.m.teachers)]
        with torch.cuda.stream(self.copy_stream):
            moved = [h.to(self.device, non_blocking=True) for h in host]
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return moved, event

    def take(self, future: concurrent.futures.Future) -> list[torch.Tensor]:
        tensors, event = future.result()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:
                t.record_stream(current)  # allocated on the copy stream, used on this one
        return tensors

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _run_chunks(m, paths, method, params, size, chunks, device, group, progress, plan) -> int:
    """Solve and write ``chunks`` (this rank's share); returns the number of samples done."""
    if not chunks:
        return 0
    files = {key: paths["partial"] / ("indices.npy" if key == "indices" else "data.npy") for key in _shapes(m, params)}
    offsets = {key: _npy_offset(files[key], *_shapes(m, params)[key]) for key in files}
    handles = {key: open(files[key], "r+b", buffering=0) for key in files}
    out_dtype = OUT_DTYPES[params["dtype"]]
    width = params["top_k"] or m.num_classes
    span = [(k * size, min(m.num_samples, (k + 1) * size)) for k in chunks]
    mine = sum(stop - start for start, stop in span)
    before = (plan["chunks_total"] - len(plan["pending"])) if group.world_size == 1 else 0
    initial = min(m.num_samples, before * size) if group.world_size == 1 else 0
    who = f"rank {group.rank}/{group.world_size} " if group.world_size > 1 else ""
    show = progress if group.rank == 0 else False
    bar = Progress(mine + initial, f"{who}{method}", enabled=show, initial=initial)
    reader = _Reader(m, size, device)
    sleep = float(os.environ.get(_SLEEP_ENV, "0") or 0)
    done = 0
    try:
        future = reader.submit(0, *span[0])
        for j, k in enumerate(chunks):
            start, stop = span[j]
            tensors = reader.take(future)
            if j + 1 < len(chunks):
                future = reader.submit((j + 1) % 2, *span[j + 1])
            tick = time.perf_counter()
            soft, info = _solve_chunk(m, method, params, plan["backend"], tensors, start)
            if params["top_k"]:
                values, index = torch.topk(soft, params["top_k"], dim=1)
                blocks = {"values": values, "indices": index.to(torch.int32)}
            else:
                blocks = {"values": soft}
            host = {key: b.to("cpu").numpy() for key, b in blocks.items()}
            host["values"] = host["values"].astype(out_dtype, copy=False)
            seconds = time.perf_counter() - tick
            for key in ("indices", "values"):
                if key not in host:
                    continue
                data = np.ascontiguousarray(host[key])
                assert data.shape == (stop - start, width)
                _write_rows(handles[key], offsets[key] + start * width * data.dtype.itemsize, data, k)
            for h in handles.values():
                os.fsync(h.fileno())
            _maybe_die(k, "after-write")
            record = {
                "chunk": k,
                "start": start,
                "stop": stop,
                "rank": group.rank,
                "backend": info["backend"],
                "alpha": info["alpha"],
                "seconds": round(seconds, 6),
            }
            if method in ITERATIVE:
                it, res = info["iterations"].double(), info["residual"].double()
                record.update(
                    iterations_max=int(it.max()),
                    iterations_mean=round(float(it.mean()), 4),
                    residual_max=float(res.max()),
                    not_converged=int((~info["converged"]).sum()),
                    tol=info["tol"],
                )
            _write_json_atomic(_chunk_record_path(paths, k), record)
            _maybe_die(k, "after-record")
            done += stop - start
            bar.update(stop - start)
            if sleep:
                time.sleep(sleep)
    finally:
        reader.close()
        for h in handles.values():
            h.close()
        bar.close()
    return done


def _write_rows(handle, offset: int, data: np.ndarray, k: int) -> None:
    view = memoryview(data).cast("B")
    if os.environ.get(_KILL_ENV) == f"{k}:mid-write":  # test-only: a torn chunk
        handle.seek(offset)
        handle.write(view[: len(view) // 2])
        os.fsync(handle.fileno())
        _maybe_die(k, "mid-write")
    handle.seek(offset)
    written = 0
    while written < len(view):
        written += handle.write(view[written:])


def _solve_chunk(m: Manifest, method: str, params: dict, backend: str, tensors: list[torch.Tensor], start: int):
    """One chunk through :func:`uhc_fast.estimate`, with errors naming the teacher and global sample."""
    try:
        arrays, inputs = _unify_kinds(m, method, tensors, params["eps"])
        soft, info = estimate(
            arrays,
            m.teacher_set,
            method,
            inputs=inputs,
            weights=m.weights,
            temperature=params["temperature"],
            alpha=params["alpha"],
            tol=params["tol"],
            max_iter=params["max_iter"],
            eps=params["eps"],
            backend=backend,
            return_info=True,
        )
    except ValueError as err:

        def name(match):
            i, row = int(match[1]), int(match[2])
            return f"teacher {i} ({m.teachers[i].name!r}), sample {start + row}"

        raise ValueError(re.sub(r"teacher (\d+), row (\d+)", name, str(err))) from None
    return soft, info


def _unify_kinds(m: Manifest, method: str, tensors: list[torch.Tensor], eps: float):
    """One ``inputs=`` kind for :func:`uhc_fast.estimate` when teachers mix probabilities and logits.

    Probability-space methods get the logit teachers' softmax; logit-space methods get the
    probability teachers' ``log(max(p, eps))`` (what estimate does to probabilities itself).
    """
    kinds = m.kinds
    if len(kinds) == 1:
        return tensors, next(iter(kinds))
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if METHODS[method] == "probs":
        return [
            torch.softmax(x.to(dtype), dim=1) if t.kind == "logits" else x
            for x, t in zip(tensors, m.teachers, strict=True)
        ], "probs"
    converted = []
    for i, (x, t) in enumerate(zip(tensors, m.teachers, strict=True)):
        if t.kind == "probs":
            check_values(i, x, "probs")  # what estimate checks before it takes logs itself
            x = torch.log(x.to(dtype).clamp_min(eps))
        converted.append(x)
    return converted, "logits"


# ---------------------------------------------------------------------- torch.distributed
class _Group:
    """The process group of a ``torchrun`` job (or a trivial one for a single process)."""

    def __init__(self, rank: int = 0, world_size: int = 1, own: bool = False) -> None:
        self.rank, self.world_size, self.own = rank, world_size, own

    @classmethod
    def from_env(cls) -> _Group:
        import torch.distributed as dist

        if not dist.is_available():
            return cls()
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # gloo carries only small control messages here; the data goes through the file system.
            # Ranks wait for each other only at the start and the end: allow long imbalances.
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
            return cls(dist.get_rank(), dist.get_world_size(), own=True)
        return cls()

    def on_rank0(self, work):
        """``work()`` on rank 0, its result broadcast to every rank. An error there is raised on
        every rank (as a JobError naming rank 0), so that no rank waits forever."""
        outcome = None
        if self.rank == 0:
            try:
                outcome = (True, work())
            except Exception as err:
                if self.world_size == 1:
                    raise
                outcome = (False, f"{type(err).__name__}: {err}")
        succeeded, value = self.broadcast(outcome)
        if not succeeded:
            raise JobError(f"rank 0: {value}")
        return value

    def broadcast(self, obj):
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        box = [None] * self.world_size
        dist.all_gather_object(box, obj)
        return box

    def close(self) -> None:
        if self.own:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.own = False
