"""Solving a job's chunks and writing their rows, each chunk followed by its completion record."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from ..api import diagnostics, solve
from ..errors import InputError
from ..inputs import convert
from ..options import Options
from . import faults
from .files import npy_data_offset, write_at, write_json_atomic
from .group import Group
from .job import OUT_DTYPES, Job, Plan, record_path
from .manifest import Manifest
from .reader import Prefetcher


class SampleError(InputError):
    """Bad teacher outputs in a chunk, located in the manifest: ``teacher`` is the teacher's index,
    ``row`` the global sample index, and the message names the teacher as the manifest does
    (``teacher 2 ('t2'), sample 137: outputs contain NaN or Inf``)."""

    def __init__(self, err: InputError, teacher_name: str | None, offset: int) -> None:
        self.teacher_name = teacher_name
        row = None if err.row is None else err.row + offset
        super().__init__(err.detail, teacher=err.teacher, row=row, argument=err.argument, value=err.value)

    def message(self, teacher_name: str | None = None, row_name: str = "sample", row_offset: int = 0) -> str:
        return super().message(teacher_name=teacher_name or self.teacher_name, row_name=row_name, row_offset=row_offset)


def solve_chunk(m: Manifest, options: Options, tensors: list[torch.Tensor], start: int) -> tuple[torch.Tensor, dict]:
    """Rows ``start:start + len`` of every teacher -> ``(soft, info)`` as :func:`uhc_fast.estimate` gives.

    Raises:
        SampleError: bad values, naming the teacher and the global sample.
    """
    try:
        batch = convert(tensors, m.teacher_set, options)
        solution = solve(batch)
    except InputError as err:
        name = m.teachers[err.teacher].name if err.teacher is not None else None
        raise SampleError(err, name, start) from None
    return solution.soft, diagnostics(batch, solution)


def solve_topk_chunk(m: Manifest, options: Options, tensors: list[torch.Tensor], start: int, width: int, maps):
    """A top-k manifest's chunk (per teacher its ids then values, as read) -> ``(ids, soft, info)``
    as :func:`uhc_fast.estimate_topk` gives, at a fixed ``width``; ``maps``: the checked
    vocabulary maps on the chunk's device.

    Raises:
        SampleError: bad values, naming the teacher and the global sample.
    """
    from ..backends.topk import solve as solve_topk
    from ..topk import diagnostics as topk_diagnostics
    from ..topk_inputs import convert as convert_topk

    try:
        batch = convert_topk(tensors[0::2], tensors[1::2], options, vocab_size=m.vocab_size, checked_maps=maps)
        solution = solve_topk(batch, width)
    except InputError as err:
        name = m.teachers[err.teacher].name if err.teacher is not None else None
        raise SampleError(err, name, start) from None
    return solution.ids, solution.soft, topk_diagnostics(batch, solution)


def run_chunks(job: Job, plan: Plan, chunks: list[int], group: Group, progress: bool | None, before: int = 0) -> int:
    """Solve and write ``chunks`` (this rank's share of the pending ones); the number of samples done.

    ``before``: samples of the job already done (the progress bar starts there).
    """
    if not chunks:
        return 0
    m = job.manifest
    options = dataclasses.replace(job.options, backend=plan.backend)
    arrays = job.arrays()
    offsets = {key: npy_data_offset(path, dtype, shape) for key, (path, dtype, shape) in arrays.items()}
    fds = {key: os.open(path, os.O_RDWR) for key, (path, _, _) in arrays.items()}
    spans = [plan.span(k, m.num_samples) for k in chunks]
    who = f"rank {group.rank}/{group.world_size} " if group.world_size > 1 else ""
    bar = tqdm(
        total=before + sum(stop - start for start, stop in spans),
        initial=before,
        desc=f"{who}{options.method}",
        unit=" samples",
        unit_scale=True,
        file=sys.stderr,
        # Rank 0 only; progress=None: only when stderr is a terminal.
        disable=True if group.rank != 0 else None if progress is None else not progress,
        mininterval=0.2 if getattr(sys.stderr, "isatty", lambda: False)() else 5.0,  # (log files want few lines)
        dynamic_ncols=True,
    )
    reader = Prefetcher(m, plan.chunk_size, job.device)
    maps = (
        [None if t.vocab_map is None else torch.from_numpy(t.vocab_map).to(job.device) for t in m.teachers]
        if m.topk
        else None
    )
    done = 0
    try:
        for k, (start, stop), rows in zip(chunks, spans, reader.read(spans), strict=True):
            tick = time.perf_counter()
            if m.topk:
                ids, soft, info = solve_topk_chunk(m, options, rows.tensors, start, job.width, maps)
                blocks = {"values": soft, "indices": ids.to(torch.from_numpy(np.zeros(0, job.index_dtype)).dtype)}
            elif job.top_k:
                soft, info = solve_chunk(m, options, rows.tensors, start)
                values, index = torch.topk(soft, job.top_k, dim=1)
                blocks = {"values": values, "indices": index.to(torch.int32)}
            else:
                soft, info = solve_chunk(m, options, rows.tensors, start)
                blocks = {"values": soft}
            host = {key: b.to("cpu").numpy() for key, b in blocks.items()}
            host["values"] = host["values"].astype(OUT_DTYPES[job.dtype], copy=False)
            seconds = time.perf_counter() - tick
            for key in ("indices", "values"):
                if key in host:
                    _write_rows(fds[key], offsets[key], start, np.ascontiguousarray(host[key]), k)
            for fd in fds.values():
                os.fsync(fd)
            faults.kill_point(k, "after-write")
            record = {
                "chunk": k,
                "start": start,
                "stop": stop,
                "rank": group.rank,
                "backend": info["backend"],
                "alpha": info["alpha"],
                "seconds": round(seconds, 6),
                "checksums": dict(zip((name for name, _ in m.sources), rows.checksums, strict=True)),
            }
            if m.topk:
                union = info["union_size"]
                record.update(
                    union_max=int(union.max()) if union.numel() else 0,
                    union_mean=round(float(union.double().mean()), 4) if union.numel() else 0.0,
                    disconnected=info["disconnected_samples"],
                    empty=info["empty_samples"],
                )
            if options.spec.iterative:
                it, res = info["iterations"].double(), info["residual"].double()
                record.update(
                    iterations_max=int(it.max()),
                    iterations_mean=round(float(it.mean()), 4),
                    residual_max=float(res.max()),
                    not_converged=int((~info["converged"]).sum()),
                    tol=info["tol"],
                )
            write_json_atomic(record_path(job.paths, k), record)
            faults.kill_point(k, "after-record")
            done += stop - start
            bar.update(stop - start)
            faults.after_chunk()
    finally:
        reader.close()
        for fd in fds.values():
            os.close(fd)
        bar.close()
    return done


def _write_rows(fd: int, data_offset: int, start: int, rows: np.ndarray, k: int) -> None:
    offset = data_offset + start * rows.shape[1] * rows.dtype.itemsize
    if faults.wants_kill(k, "mid-write"):  # a torn chunk
        write_at(fd, offset, memoryview(rows).cast("B")[: rows.nbytes // 2])
        os.fsync(fd)
        faults.kill_point(k, "mid-write")
    write_at(fd, offset, rows)
