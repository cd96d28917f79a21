"""Out-of-core estimation: teacher outputs on disk -> soft labels on disk, in fixed chunks.

:func:`estimate_manifest` reads a manifest, splits the B samples into chunks of ``chunk_size``
rows (chunk ``k`` is rows ``[k * chunk_size, (k + 1) * chunk_size)``, whatever the number of
processes), solves each chunk as :func:`uhc_fast.estimate` would and writes its rows into a
``(B, K)`` ``.npy`` with positioned writes: memory is bounded by the chunk size, never by B.

A job holds a lock on its output while it runs, is crash-safe and resumable (the result is then
byte-identical to an uninterrupted run), and runs unchanged under ``torchrun``. One module per
concern: :mod:`.manifest` (the manifest and the teacher files), :mod:`.job` (settings, identity,
existing files, resume decisions, the sidecar), :mod:`.lock` (the output lock), :mod:`.files`
(durable I/O), :mod:`.reader` (reading ahead, checksums), :mod:`.group` (``torch.distributed``),
:mod:`.chunks` (solving and writing chunks), :mod:`.faults` (test-only fault injection) and
:mod:`.run` (the job from start to end). See ``docs/manifest.md``.
"""

from __future__ import annotations

from .chunks import SampleError
from .job import OUT_DTYPES, JobError, default_chunk_size, output_paths
from .manifest import Manifest, ManifestError, load_manifest
from .run import JobResult, estimate_manifest

__all__ = [
    "OUT_DTYPES",
    "JobError",
    "JobResult",
    "Manifest",
    "ManifestError",
    "SampleError",
    "default_chunk_size",
    "estimate_manifest",
    "load_manifest",
    "output_paths",
]
