"""What every backend is: a name, the devices and methods it serves, and its solve function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    """One way of solving batches.

    Attributes:
        name: the public ``backend=`` string.
        device_types: torch device types it runs on (``"cpu"``, ``"cuda"``).
        methods: the method names it implements.
        solve: ``solve(batch, method) -> Solution`` (``method`` a :class:`~uhc_fast.methods.Method`).
        loss: ``loss(student_logits, problem) -> (B,)``, the direct-CE loss with autograd.
        details: what :func:`uhc_fast.info` reports about it (called then: loading a backend, which
            may happen inside a ``torch.compile`` trace, asks its extension nothing).
    """

    name: str
    device_types: tuple[str, ...]
    methods: frozenset[str]
    solve: Callable
    loss: Callable
    details: Callable[[], dict] = dict
