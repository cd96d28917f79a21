"""Test-only fault injection, driven by environment variables (unset in normal use: every hook is
then a no-op).

- ``_UHC_FAST_KILL="CHUNK:PHASE"`` (``CHUNK`` a chunk number or ``*``): the process SIGKILLs itself
  at that point, exactly as ``kill -9`` would. Phases: ``mid-write`` (half of the chunk's rows
  written), ``after-write``, ``after-record``, ``before-sidecar``.
- ``_UHC_FAST_SLEEP="SECONDS"``: sleep after each chunk (a slow job to interrupt).
- ``_UHC_FAST_HOLD="PATH"``: after each chunk, wait until ``PATH`` exists (a job held running).
"""

from __future__ import annotations

import os
import signal
import time

KILL_ENV = "_UHC_FAST_KILL"
SLEEP_ENV = "_UHC_FAST_SLEEP"
HOLD_ENV = "_UHC_FAST_HOLD"


def wants_kill(chunk: int | str, phase: str) -> bool:
    """Whether the process is to die at ``phase`` of ``chunk``."""
    return os.environ.get(KILL_ENV) == f"{chunk}:{phase}"


def kill_point(chunk: int | str, phase: str) -> None:
    """Die here (SIGKILL) if asked to."""
    if wants_kill(chunk, phase):
        os.kill(os.getpid(), signal.SIGKILL)


def after_chunk() -> None:
    """The pause asked for after each chunk, if any."""
    seconds = float(os.environ.get(SLEEP_ENV, "0") or 0)
    if seconds:
        time.sleep(seconds)
    gate = os.environ.get(HOLD_ENV)
    while gate and not os.path.exists(gate):
        time.sleep(0.01)
