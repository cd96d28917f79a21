""":func:`estimate_manifest`: one streaming job, from its options to its sidecar, on every rank."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..constants import DEFAULT_EPS
from ..options import Options
from .chunks import run_chunks
from .group import Group
from .job import Job, JobError, changed_inputs, finalise, prepare
from .lock import OutputLock
from .manifest import Manifest, load_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    """What one call of :func:`estimate_manifest` did.

    Attributes:
        status: ``"complete"`` (this call finished the job) or ``"already complete"``.
        out, sidecar, indices: the result's files (``indices`` only for top-k output).
        chunks_total: chunks in the job; chunks_before: finished ones kept from an earlier run;
        chunks_run / samples_run: done by this process in this call.
        seconds: wall time of this call. rank / world_size: this process in the job.
        chunks_changed: finished chunks whose inputs had changed since, so recomputed.
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
    chunks_changed: int = 0


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
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
    device: str | torch.device | None = None,
    resume: bool = False,
    force: bool = False,
    wait: bool = False,
    progress: bool | None = None,
) -> JobResult:
    """Estimate soft labels for every sample of a manifest, streaming, into ``out`` (a ``.npy``).

    A top-k manifest (teachers with ``indices`` and ``values`` files, ``docs/topk.md``) runs
    :func:`uhc_fast.estimate_topk` chunk by chunk instead: ``out`` then holds ``(B, M)`` soft labels
    and ``<stem>.indices.npy`` the ids beside them (``M = top_k``, or ``sum k_i``; -1 / 0 padding).

    Args:
        manifest: a manifest path or a loaded :class:`~uhc_fast.stream.manifest.Manifest`.
        out: the ``(B, K)`` output ``.npy`` (``(B, top_k)`` values with ``top_k``); the sidecar is
            ``out`` with suffix ``.json``, top-k class indices go to ``<stem>.indices.npy``.
        method: as in :func:`uhc_fast.estimate`.
        chunk_size: samples per chunk (default: :func:`default_chunk_size`). Fixed for the job: a
            resumed job keeps the chunk size it started with.
        dtype: stored soft-label dtype, ``"float32"``, ``"float16"`` or ``"float64"``.
        top_k: keep only the ``top_k`` largest soft labels per sample (values sorted descending,
            int32 class indices beside them; for a top-k manifest, renormalised as
            :func:`uhc_fast.estimate_topk` does).
        temperature, alpha, tol, max_iter, eps, backend: as in :func:`uhc_fast.estimate`.
        device: where to compute (default: CUDA when available, else CPU). Under ``torchrun``,
            ``cuda`` is each rank's ``cuda:LOCAL_RANK``.
        resume: finish an interrupted job: finished chunks whose input rows are unchanged are
            kept, the others are computed.
        force: delete this output's existing files and start over.
        wait: if another job is writing ``out``, wait for it to finish instead of failing.
        progress: show a progress bar on stderr (``None``: only when stderr is a terminal).

    Returns:
        A :class:`JobResult`. Re-running a finished job (same settings and teachers, unchanged
        values) does nothing and returns ``status="already complete"`` unless ``force``.

    Raises:
        ManifestError, ValueError: bad manifest or parameters, before any work starts.
        JobError: another job is writing ``out`` (without ``wait``), existing outputs without
            ``resume``/``force``, a different job to resume, a failed rank.
        SampleError: bad values in a teacher's outputs, naming the teacher and the sample (the
            finished chunks are kept for ``resume``).
    """
    started = time.perf_counter()
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    try:
        if m.topk and (temperature != 1.0 or eps != DEFAULT_EPS):
            raise ValueError(
                "temperature and eps do not apply to a top-k manifest (its teachers' values are used as given)"
            )
        options = Options(
            method=method,
            inputs=tuple(t.kind for t in m.teachers),
            weights=m.weights,
            temperature=temperature,
            alpha=alpha,
            tol=tol,
            max_iter=max_iter,
            eps=eps,
            backend=backend,
            topk=m.topk,
        )
        job = Job.create(m, out, options, chunk_size=chunk_size, dtype=dtype, top_k=top_k, device=device)
        return _run(job, resume=resume, force=force, wait=wait, progress=progress, started=started)
    finally:
        if not isinstance(manifest, Manifest):
            m.close()


def _run(job: Job, *, resume: bool, force: bool, wait: bool, progress: bool | None, started: float) -> JobResult:
    group = Group.from_env()
    lock = OutputLock(job.paths["lock"])  # taken by rank 0 for the ranks of the job

    def begin():
        lock.acquire(wait)
        return prepare(job, resume=resume, force=force)

    try:
        job = dataclasses.replace(job, device=group.device(job.device))
        scope = torch.cuda.device(job.device) if job.device.type == "cuda" else contextlib.nullcontext()
        with scope:
            plan = group.on_rank0(begin)
            checked = group.share(sorted(plan.done))
            changed = {}
            for part in group.on_every_rank(lambda: changed_inputs(job, plan, checked)):
                changed.update(part)
            paths, total = job.paths, plan.chunks_total
            result = dict(
                out=paths["values"],
                sidecar=paths["sidecar"],
                indices=paths["indices"],
                chunks_total=total,
                rank=group.rank,
                world_size=group.world_size,
            )
            if plan.status == "already complete":
                if changed:
                    raise JobError(
                        f"{paths['values']} holds the result of a different job (the inputs changed: "
                        f"{_describe(changed)}); pass --force to overwrite it"
                    )
                seconds = time.perf_counter() - started
                return JobResult(
                    "already complete", chunks_before=total, chunks_run=0, samples_run=0, seconds=seconds, **result
                )
            if changed and group.rank == 0:
                log.warning("recomputing finished chunks whose inputs changed: %s", _describe(changed))
            pending = sorted(set(range(total)) - set(plan.done) | set(changed))
            mine = group.share(pending)
            n = job.manifest.num_samples
            before = n - sum(stop - start for start, stop in (plan.span(k, n) for k in pending))
            samples = group.on_every_rank(
                lambda: run_chunks(job, plan, mine, group, progress, before if group.world_size == 1 else 0),
                note=" (finished chunks are kept: run again with --resume)",
            )[group.rank]
            group.on_rank0(lambda: finalise(job, plan, group.world_size))
            return JobResult(
                "complete",
                chunks_before=total - len(pending),
                chunks_run=len(mine),
                samples_run=samples,
                seconds=time.perf_counter() - started,
                chunks_changed=len(changed),
                **result,
            )
    finally:
        lock.release()
        group.close()


def _describe(changed: dict[int, list[str]]) -> str:
    """``teacher 't0' in chunks [0, 3]; teacher 't2' in chunks [3]``."""
    by_teacher: dict[str, list[int]] = {}
    for k in sorted(changed):
        for name in changed[k]:
            by_teacher.setdefault(name, []).append(k)
    return "; ".join(
        f"teacher {name!r} in chunk{'s' if len(ks) > 1 else ''} {ks[:10]}{' ...' if len(ks) > 10 else ''}"
        for name, ks in by_teacher.items()
    )
