"""The processes of one job: a ``torchrun`` process group (gloo), or a single process.

Only small control messages travel through the group (the plan, errors, which chunks changed);
the data goes through the shared file system.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .job import JobError

T = TypeVar("T")


class RankError(JobError):
    """Another rank of the job failed (the message names the rank and its error)."""


class Group:
    """This process's place in the job: ``rank`` of ``world_size``."""

    def __init__(self, rank: int = 0, world_size: int = 1, own: bool = False) -> None:
        self.rank, self.world_size, self.own = rank, world_size, own

    @classmethod
    def from_env(cls) -> Group:
        """The initialised ``torch.distributed`` group, else a gloo group when ``WORLD_SIZE`` > 1
        (a ``torchrun`` launch; closed by :meth:`close`), else a single process."""
        import torch.distributed as dist

        if not dist.is_available():
            return cls()
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Ranks wait for each other only at the start and the end: allow long imbalances.
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
            return cls(dist.get_rank(), dist.get_world_size(), own=True)
        return cls()

    def device(self, device: torch.device) -> torch.device:
        """This rank's device. Under ``torchrun``, ``cuda`` means ``cuda:LOCAL_RANK`` (modulo the
        visible devices), made the current device so that every launch goes there."""
        if device.type != "cuda" or self.world_size == 1:
            return device
        if device.index is None:
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device

    def share(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous share of ``items`` (the shares of all ranks partition them, in order)."""
        n = len(items)
        return items[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]

    def on_rank0(self, work: Callable[[], T]) -> T:
        """``work()`` on rank 0, its result broadcast to every rank. An error there is raised on
        every rank (as a :class:`RankError` naming rank 0 on the others), so that no rank waits forever."""
        outcome = None
        if self.rank == 0:
            try:
                outcome = (True, work())
            except Exception as err:
                if self.world_size == 1:
                    raise
                self.broadcast((False, f"{type(err).__name__}: {err}"))
                raise
        succeeded, value = self.broadcast(outcome)
        if not succeeded:
            raise RankError(f"rank 0: {value}")
        return value

    def on_every_rank(self, work: Callable[[], T], note: str = "") -> list[T]:
        """``work()`` on every rank; the results of all ranks, in rank order. If any rank fails, it
        raises its own error and the others a :class:`RankError` naming the failed ranks (+ ``note``)."""
        error = None
        try:
            outcome = (True, work())
        except Exception as err:
            if self.world_size == 1:
                raise
            error, outcome = err, (False, f"rank {self.rank}: {type(err).__name__}: {err}")
        outcomes = self.gather(outcome)
        if error is not None:
            raise error
        failed = [value for succeeded, value in outcomes if not succeeded]
        if failed:
            raise RankError("; ".join(failed) + note)
        return [value for _, value in outcomes]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        box = [None] * self.world_size
        dist.all_gather_object(box, obj)
        return box

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.own:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.own = False
