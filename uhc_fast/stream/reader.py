"""Reading the teachers' rows chunk by chunk, one chunk ahead, with a checksum of what was read.

The next chunk is read on a background thread while the current one computes. On CUDA it is read
into pinned memory and copied to the device on a side stream. Each teacher's rows are hashed as
they are read (:func:`checksum`): a job records the hashes with each finished chunk.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .manifest import Manifest


def checksum(rows: torch.Tensor) -> str:
    """blake2b-128 (hex) of a CPU tensor's values as read: native byte order, row-major."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(rows.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class Rows:
    """One chunk of every teacher's outputs.

    Attributes:
        tensors: per source (each teacher's outputs; for a top-k manifest each teacher's ids then
            values: ``Manifest.sources``), ``(rows, C_i)`` in the stored dtype, on the reader's device.
        checksums: per source, :func:`checksum` of its rows.
    """

    tensors: list[torch.Tensor]
    checksums: list[str]


class Prefetcher:
    """Reads ranges of rows one ahead, on one thread (see :meth:`read`)."""

    def __init__(self, m: Manifest, chunk_size: int, device: torch.device) -> None:
        self.m = m
        self.device = device
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="uhc-read")
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.pinned = [
                [torch.empty((chunk_size, t.row_bytes), dtype=torch.uint8).pin_memory().numpy() for _, t in m.sources]
                for _ in range(2)
            ]

    def read(self, ranges: Sequence[tuple[int, int]]) -> Iterator[Rows]:
        """The :class:`Rows` of each ``(start, stop)`` range in turn; the next range is read while
        the caller works on the current one (which must be finished with when it asks for the next)."""
        if not ranges:
            return
        future = self.submit(0, *ranges[0])
        for j in range(len(ranges)):
            rows = self.take(future)
            if j + 1 < len(ranges):
                # Slot (j + 1) % 2 last held range j - 1, which the caller is done with.
                future = self.submit((j + 1) % 2, *ranges[j + 1])
            yield rows

    def submit(self, slot: int, start: int, stop: int) -> concurrent.futures.Future:
        """Start reading rows ``start:stop`` (into pinned slot ``slot`` on CUDA)."""
        return self.pool.submit(self._load, slot, start, stop)

    def _load(self, slot: int, start: int, stop: int):
        if not self.cuda:
            host = [t.read(start, stop) for _, t in self.m.sources]
            return host, [checksum(h) for h in host], None
        host = [t.read(start, stop, out=self.pinned[slot][i]) for i, (_, t) in enumerate(self.m.sources)]
        with torch.cuda.stream(self.copy_stream):
            moved = [h.to(self.device, non_blocking=True) for h in host]
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return moved, [checksum(h) for h in host], event  # hashed while the copy runs

    def take(self, future: concurrent.futures.Future) -> Rows:
        """The rows of a submitted range, usable on the current stream."""
        tensors, sums, event = future.result()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:
                t.record_stream(current)  # allocated on the copy stream, used on this one
        return Rows(tensors, sums)

    def close(self) -> None:
        """Stop reading (a pending range is dropped)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
