"""A streaming job: its settings and identity, what to do with the files already there, and the end.

Files, for ``out = "soft.npy"``:

- ``soft.npy.lock`` while a job runs (:mod:`uhc_fast.stream.lock`).
- ``soft.npy.partial/`` while the job is unfinished: ``data.npy`` (and ``indices.npy`` for top-k
  output), ``job.json`` (the job's fingerprint, chunk size and backend) and
  ``chunks/NNNNNNNN.json``, one record per finished chunk (its rows, diagnostics and the checksum
  of the input rows it read), written atomically only after the chunk's rows are on disk.
- ``soft.npy`` (``soft.indices.npy``) and ``soft.json`` (the sidecar: class names, method,
  parameters, per-chunk records, ``"status": "complete"``) once every chunk is done. The data file
  is renamed into place only when complete, so a ``soft.npy`` is never partial.

A job's fingerprint is what its result depends on besides the teachers' values: the method and
parameters, the union's classes and each teacher's name, classes, kind, weight, shape and dtype
(for a top-k manifest: each teacher's ids and values dtypes and its vocabulary map's digest).

A top-k manifest (``docs/topk.md``) writes ``(B, M)`` ids (``soft.indices.npy``, int32 where the
ids fit, else int64) and soft labels: ``M`` is ``top_k`` or ``sum k_i``, the largest union possible.
The values are identified chunk by chunk, by the checksums in the chunk records: a resumed job
keeps the finished chunks whose input rows are unchanged and recomputes the others.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__, backends
from ..options import Options
from . import faults
from .files import create_npy, fsync_dir, npy_data_offset, read_json, write_json_atomic
from .manifest import Manifest
from .reader import Prefetcher

log = logging.getLogger(__name__)

FORMAT = "uhc_fast.soft_labels/1"
OUT_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "float64": np.dtype("<f8")}
INDEX_DTYPE = np.dtype("<i4")
WIDE_INDEX_DTYPE = np.dtype("<i8")  # top-k ids that may not fit int32
# Default chunk: about this many stored elements (teacher outputs + soft labels) per chunk.
_CHUNK_ELEMENTS = 1 << 24


class JobError(RuntimeError):
    """The job cannot start or finish as asked (existing outputs, a running or a different job, a failed rank)."""


def output_paths(out: str | os.PathLike, top_k: int | None = None) -> dict[str, Path | None]:
    """The files a job writes for ``out``: values, indices, sidecar, the partial folder and the lock."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"out={str(out)!r}: the output must be a .npy path")
    return {
        "values": out,
        "indices": out.with_name(out.stem + ".indices.npy") if top_k else None,
        "sidecar": out.with_suffix(".json"),
        "partial": out.with_name(out.name + ".partial"),
        "lock": out.with_name(out.name + ".lock"),
    }


def default_chunk_size(manifest: Manifest) -> int:
    """Rows per chunk when none is given: ~16M stored elements, between 256 and 65536 rows."""
    if manifest.topk:  # ids and values in, at most as many ids and soft labels out
        per_row = 4 * manifest.slots
    else:
        per_row = sum(t.shape[1] for t in manifest.teachers) + manifest.num_classes
    return int(min(65536, max(256, _CHUNK_ELEMENTS // per_row)))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked (``None``/``"auto"``: CUDA when available, else CPU)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={str(device)!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}: expected cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available in this process")
    return dev


@dataclass(frozen=True)
class Job:
    """What one call of :func:`~uhc_fast.stream.estimate_manifest` is asked to compute, validated.

    Attributes:
        manifest: the teachers.
        options: the estimation options (``backend`` as asked; a job resolves ``"auto"`` once).
        paths: :func:`output_paths`.
        dtype, top_k: how the soft labels are stored.
        device: where chunks are computed.
        chunk_size: as asked (None: the default, or the size a resumed job started with).
    """

    manifest: Manifest
    options: Options
    paths: dict[str, Path | None]
    dtype: str
    top_k: int | None
    device: torch.device
    chunk_size: int | None = None

    @classmethod
    def create(
        cls,
        m: Manifest,
        out: str | os.PathLike,
        options: Options,
        *,
        chunk_size: int | None,
        dtype: str,
        top_k: int | None,
        device: str | torch.device | None,
    ) -> Job:
        """Check the streaming parameters (``options`` are checked by their construction)."""
        if dtype not in OUT_DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {tuple(OUT_DTYPES)}")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size={chunk_size!r}: must be an int >= 1")
        if m.topk:
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k={top_k!r}: must be an int >= 1")
        elif top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= m.num_classes
        ):
            raise ValueError(f"top_k={top_k!r}: must be an int between 1 and K={m.num_classes}")
        paths = output_paths(out, top_k or m.topk)
        dev = resolve_device(device)
        job = cls(m, options, paths, dtype, top_k, dev, chunk_size)
        job.backend_for(options.backend)  # a forced backend that cannot run here fails now
        return job

    def backend_for(self, backend: str) -> str:
        """The backend ``backend`` resolves to for this job's device and method (RuntimeError when
        it cannot run here): a dense backend, or for a top-k manifest a top-k one."""
        if self.manifest.topk:
            from ..backends.topk import select

            return select(backend, self.device)
        return backends.select(backend, self.device, self.options.method).name

    @property
    def width(self) -> int:
        """Stored columns per sample: K, or ``top_k`` (top-k manifests: ``top_k`` or ``sum k_i``)."""
        if self.manifest.topk:
            return self.top_k or self.manifest.slots
        return self.top_k or self.manifest.num_classes

    @property
    def index_dtype(self) -> np.dtype:
        """The stored ids' dtype: int32, or for a top-k manifest whose ids may not fit, int64."""
        m = self.manifest
        if not m.topk:
            return INDEX_DTYPE
        limit = 2**31 - 1
        fits = m.vocab_size is not None and m.vocab_size <= limit
        fits = fits or all(
            (t.vocab_map is not None and (t.vocab_map.size == 0 or int(t.vocab_map.max()) < limit))
            or (t.vocab_map is None and t.indices.dtype in (torch.int16, torch.int32))
            for t in m.teachers
        )
        return INDEX_DTYPE if fits else WIDE_INDEX_DTYPE

    def arrays(self) -> dict[str, tuple[Path, np.dtype, tuple[int, int]]]:
        """The partial job's data files: ``{"values": (path, dtype, shape), ["indices": ...]}``."""
        shape = (self.manifest.num_samples, self.width)
        found = {"values": (self.paths["partial"] / "data.npy", OUT_DTYPES[self.dtype], shape)}
        if self.top_k or self.manifest.topk:
            found["indices"] = (self.paths["partial"] / "indices.npy", self.index_dtype, shape)
        return found

    def parameters(self) -> dict:
        """Every setting that changes the result (the manifest's teachers aside)."""
        settings = self.options.as_dict()
        del settings["inputs"], settings["weights"]  # per teacher, in the fingerprint's "teachers"
        return {**settings, "dtype": self.dtype, "top_k": self.top_k, "device": self.device.type}

    def fingerprint(self) -> dict:
        """The job's identity (the teachers' values aside: see the module's docstring), as JSON values."""
        m = self.manifest
        if m.topk:
            teachers = [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "weight": t.weight,
                    "shape": list(t.shape),
                    "indices_dtype": str(t.indices.dtype).removeprefix("torch."),
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "vocab_map": t.map_digest,
                }
                for t in m.teachers
            ]
            found = {"format": FORMAT, "mode": "topk", **self.parameters(), "vocab_size": m.vocab_size}
            return json.loads(json.dumps({**found, "teachers": teachers}))
        teachers = [
            {
                "name": t.name,
                "classes": list(t.classes),
                "kind": t.kind,
                "weight": t.weight,
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
            }
            for t in m.teachers
        ]
        found = {"format": FORMAT, **self.parameters(), "classes": list(m.class_names), "teachers": teachers}
        return json.loads(json.dumps(found))  # tuples -> lists: comparable with what a file holds


@dataclass
class Plan:
    """Rank 0's decision, shared with every rank.

    Attributes:
        status: ``"run"`` or ``"already complete"``.
        chunk_size: the job's chunk size; chunks_total: its number of chunks.
        backend: the backend every chunk runs on (``"auto"`` resolved once per job).
        done: the finished chunks' records by chunk number (to check against the inputs).
    """

    status: str
    chunk_size: int
    chunks_total: int
    backend: str | None = None
    done: dict[int, dict] = field(default_factory=dict)

    def span(self, k: int, num_samples: int) -> tuple[int, int]:
        """Rows ``start, stop`` of chunk ``k``."""
        return k * self.chunk_size, min(num_samples, (k + 1) * self.chunk_size)


def record_path(paths: dict, k: int) -> Path:
    """Chunk ``k``'s completion record."""
    return paths["partial"] / "chunks" / f"{k:08d}.json"


def _done_chunks(job: Job, size: int) -> dict[int, dict]:
    """The completion records in the partial folder that fit the job's chunks."""
    plan = Plan("run", size, -(-job.manifest.num_samples // size))
    done = {}
    for file in sorted((job.paths["partial"] / "chunks").glob("*.json")):
        rec = read_json(file)
        k = rec.get("chunk") if isinstance(rec, dict) else None
        if isinstance(k, int) and 0 <= k < plan.chunks_total:
            if (rec.get("start"), rec.get("stop")) == plan.span(k, job.manifest.num_samples):
                done[k] = rec
    return done


def _remove_outputs(paths: dict) -> None:
    for key in ("values", "indices", "sidecar"):
        if paths.get(key) is not None and paths[key].exists():
            paths[key].unlink()
    if paths["partial"].exists():
        shutil.rmtree(paths["partial"])


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def prepare(job: Job, *, resume: bool, force: bool) -> Plan:
    """Rank 0, holding the output lock: decide what to do with the files there, create a new job's
    files, and list the finished chunks.

    ``backend="auto"`` is resolved here, once, and kept by the job: every rank and every resume
    then runs the same backend, so the result does not depend on where each chunk ran.
    """
    m, paths = job.manifest, job.paths
    values, partial = paths["values"], paths["partial"]
    fingerprint = job.fingerprint()
    if force:
        _remove_outputs(paths)
    side = read_json(paths["sidecar"]) if paths["sidecar"].exists() else None
    ours = isinstance(side, dict) and side.get("format") == FORMAT
    if ours and side.get("status") == "complete" and side.get("fingerprint") == fingerprint and values.exists():
        size = side.get("parameters", {}).get("chunk_size", 1)
        if partial.exists():  # a job killed after its sidecar, before removing this
            shutil.rmtree(partial)
        records = {r["chunk"]: r for r in side.get("chunks", []) if isinstance(r, dict) and "chunk" in r}
        return Plan("already complete", size, -(-m.num_samples // size), done=records)
    job_file = read_json(partial / "job.json") if partial.is_dir() else None
    job_file = job_file if isinstance(job_file, dict) else None
    # A job killed while moving its data into place: its files are ours, --resume moves them back.
    moved = {
        key: src
        for key, (src, _, _) in job.arrays().items()
        if job_file is not None and not src.exists() and paths[key].exists()
    }
    finals = [p for key in ("values", "indices", "sidecar") if (p := paths[key]) is not None and p.exists()]
    finals = [p for p in finals if p not in (paths[key] for key in moved)]
    if finals:
        if ours and side.get("fingerprint") is not None:
            diff = _differences(side["fingerprint"], fingerprint)
            raise JobError(
                f"{values} holds the result of a different job (differs in {diff}); pass --force to overwrite it"
            )
        raise JobError(f"{finals[0]} already exists; pass --force to overwrite it")
    if job_file is None:
        return _create(job, fingerprint)
    if not resume:
        raise JobError(f"{partial} holds an interrupted job; pass --resume to finish it or --force to start over")
    if job_file.get("fingerprint") != fingerprint:
        diff = _differences(job_file.get("fingerprint") or {}, fingerprint)
        raise JobError(
            f"cannot resume {partial}: it was started with different settings or teachers "
            f"(differs in {diff}); pass --force to start over"
        )
    size = job_file.get("chunk_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise JobError(f"{partial / 'job.json'} is damaged (chunk_size={size!r}); pass --force to start over")
    if job.chunk_size is not None and job.chunk_size != size:
        raise JobError(
            f"cannot resume with chunk_size={job.chunk_size}: the job was started with "
            f"chunk_size={size} (omit it to keep that one)"
        )
    backend = job_file.get("backend")
    try:
        job.backend_for(backend)
    except (RuntimeError, ValueError) as err:
        raise JobError(
            f"cannot resume {partial}: it was started with backend {backend!r}, which cannot run here ({err}); "
            "its results would differ in rounding: resume where it can run, or pass --force to start over"
        ) from None
    for key, src in moved.items():
        os.replace(paths[key], src)
    if moved:
        fsync_dir(partial)
    for path, dtype, shape in job.arrays().values():
        try:
            npy_data_offset(path, dtype, shape)
        except (OSError, ValueError) as err:
            raise JobError(f"cannot resume {partial}: {err}; pass --force to start over") from None
    plan = Plan("run", size, -(-m.num_samples // size), backend, _done_chunks(job, size))
    if plan.done:
        log.info("resuming %s: %d of %d chunks already done", values, len(plan.done), plan.chunks_total)
    return plan


def _create(job: Job, fingerprint: dict) -> Plan:
    """A fresh job's partial folder (a partial folder without a job.json is a job that never started)."""
    partial = job.paths["partial"]
    if partial.exists():
        shutil.rmtree(partial)
    size = job.chunk_size or default_chunk_size(job.manifest)
    backend = job.backend_for(job.options.backend)
    (partial / "chunks").mkdir(parents=True)
    for path, dtype, shape in job.arrays().values():
        create_npy(path, dtype, shape)
    m = job.manifest
    write_json_atomic(
        partial / "job.json",
        {
            "fingerprint": fingerprint,
            "chunk_size": size,
            "backend": backend,
            "started": _now(),
            "manifest": str(m.path.resolve()) if m.path else None,
        },
    )
    fsync_dir(partial)
    return Plan("run", size, -(-m.num_samples // size), backend)


def changed_inputs(job: Job, plan: Plan, chunks: list[int]) -> dict[int, list[str]]:
    """Of the finished ``chunks``, those whose input rows differ from what they were computed from,
    with the names of the teachers that changed.

    In a job to run, their completion records are removed (they are recomputed).
    """
    m = job.manifest
    names = [name for name, _ in m.sources]
    reader = Prefetcher(m, plan.chunk_size, torch.device("cpu"))
    changed = {}
    try:
        spans = [plan.span(k, m.num_samples) for k in chunks]
        for k, rows in zip(chunks, reader.read(spans), strict=True):
            recorded = plan.done[k].get("checksums")
            recorded = recorded if isinstance(recorded, dict) else {}
            differ = [n for n, now in zip(names, rows.checksums, strict=True) if recorded.get(n) != now]
            if differ:
                changed[k] = differ
    finally:
        reader.close()
    if changed and plan.status == "run":
        for k in changed:
            record_path(job.paths, k).unlink(missing_ok=True)
        fsync_dir(job.paths["partial"] / "chunks")
    return changed


def finalise(job: Job, plan: Plan, world_size: int) -> None:
    """Rank 0, after every rank finished: check every chunk, move the data into place, write the sidecar."""
    m, paths = job.manifest, job.paths
    done = _done_chunks(job, plan.chunk_size)
    missing = [k for k in range(plan.chunks_total) if k not in done]
    if missing:
        raise JobError(f"chunks {missing[:10]} have no completion record; run again with --resume")
    partial = paths["partial"]
    # Indices first, values last: a values file in place means everything before it is too.
    for key in ("indices", "values"):
        if key in job.arrays():
            os.replace(job.arrays()[key][0], paths[key])
    fsync_dir(paths["values"].parent)
    faults.kill_point("*", "before-sidecar")
    records = [done[k] for k in range(plan.chunks_total)]
    job_file = read_json(partial / "job.json") or {}
    side = {
        "format": FORMAT,
        "status": "complete",
        "fingerprint": job.fingerprint(),
        "classes": list(m.class_names),
        "method": job.options.method,
        "shape": [m.num_samples, job.width],
        "num_classes": m.num_classes,
        "dtype": job.dtype,
        "files": {"values": paths["values"].name, "indices": paths["indices"].name if paths["indices"] else None},
        "parameters": {**job.parameters(), "chunk_size": plan.chunk_size},
        "manifest": {"path": str(m.path.resolve()) if m.path else None, "digest": m.digest},
        "teachers": [
            {"name": t.name, "kind": t.kind, "weight": t.weight, "classes": len(t.classes), "outputs": str(t.path)}
            if not m.topk
            else {
                "name": t.name,
                "kind": t.kind,
                "weight": t.weight,
                "k": t.shape[1],
                "indices": str(t.indices.path),
                "values": str(t.values.path),
                "vocab_map": str(t.map_path) if t.map_path else None,
            }
            for t in m.teachers
        ],
        "summary": _summary(records, m.num_samples),
        "chunks": records,
        "world_size": world_size,
        "started": job_file.get("started"),
        "finished": _now(),
        "versions": {"uhc_fast": __version__, "torch": torch.__version__, "numpy": np.__version__},
    }
    if m.topk:
        side.update(mode="topk", vocab_size=m.vocab_size, index_dtype=str(job.index_dtype))
    write_json_atomic(paths["sidecar"], side)
    fsync_dir(paths["sidecar"].parent)
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
    if records and "union_max" in records[0]:  # top-k
        summary["max_union"] = max(r["union_max"] for r in records)
        summary["mean_union"] = sum(r["union_mean"] * (r["stop"] - r["start"]) for r in records) / max(1, num_samples)
        summary["disconnected_samples"] = sum(r["disconnected"] for r in records)
        summary["empty_samples"] = sum(r["empty"] for r in records)
    return summary


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
