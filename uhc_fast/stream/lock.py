"""The output lock: one job at a time writes an output.

A job holds an exclusive advisory lock (``flock``) on ``<out>.lock`` from before it looks at the
output's files until it is done with them. The file holds a JSON record of the holder (pid, host,
start time, command) for the messages of the jobs it keeps out; the lock itself is the kernel's,
released when the holder exits however it exits, so a lock file left by a dead job blocks nothing.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

from .files import read_json
from .job import JobError

log = logging.getLogger(__name__)


class OutputLock:
    """An exclusive lock on ``path`` (see the module's docstring). :meth:`acquire`, :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        """Take the lock, creating ``path`` (and its folder) as needed.

        Raises:
            JobError: the lock is held by a running job (named by pid, host and start time),
                unless ``wait``, which waits for that job to finish.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = describe_holder(read_json(self.path))
                    if not wait:
                        raise JobError(
                            f"{self.path.with_suffix('')} is being written by a running job ({holder}); "
                            "wait for it to finish or pass --wait"
                        ) from None
                    log.warning("waiting for the job writing %s to finish (%s)", self.path.with_suffix(""), holder)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            if self._holds_the_file_at_path(fd):
                break
            os.close(fd)  # the holder removed the file as it released it: lock the current one
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd

    def _holds_the_file_at_path(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        """Remove the lock file and release the lock (nothing if not held)."""
        if self.fd is None:
            return
        try:
            if self._holds_the_file_at_path(self.fd):
                self.path.unlink()
        finally:
            os.close(self.fd)
            self.fd = None


def describe_holder(record) -> str:
    """The holder of a lock, from its record: ``pid 123 on host 'h' since 2024-...: uhc-fast ...``."""
    if not isinstance(record, dict) or "pid" not in record:
        return "its lock record is not written yet"
    text = f"pid {record.get('pid')} on host {record.get('host')!r} since {record.get('started')}"
    return text + (f", command: {record['command']}" if record.get("command") else "")
