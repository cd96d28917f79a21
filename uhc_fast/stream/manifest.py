"""The job manifest: which teachers, which classes, where their outputs are on disk.

A manifest is a JSON object (see ``docs/manifest.md``)::

    {"classes": ["cat", "dog", ...],                       # optional: fixed union order
     "teachers": [{"name": "t0", "classes": ["cat", ...],   # names, or indices into the union
                   "outputs": "t0.npy", "kind": "probs",    # .npy or .safetensors, (B, |classes|)
                   "weight": 1.0}, ...]}                    # optional per-teacher weight

or, for teachers' top-k outputs (a class set per sample, ``docs/topk.md``), a *top-k manifest*
whose teachers give ``(B, k_i)`` ``indices`` and ``values`` files instead of ``classes`` and
``outputs``::

    {"vocab_size": 151936,                                 # optional bound on the shared ids
     "teachers": [{"name": "t0", "indices": "t0_ids.npy", "values": "t0_p.npy",
                   "kind": "probs",                         # probs, logprobs or logits
                   "vocab_map": "t0_map.npy"}, ...]}        # optional: own ids -> shared ids

:func:`load_manifest` validates everything that can be checked without reading the samples
(files exist and parse, 2-D float arrays whose column counts match the class lists, one sample
count across teachers, classes known to a fixed union) and reports every problem found in one
:class:`ManifestError`, before any work starts. :class:`TeacherSource` then reads row ranges of a
teacher's outputs with positioned reads: resident memory stays proportional to the rows asked
for, not to the file (a memory map would count every page touched).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..problem import TeacherSet

KINDS = ("probs", "logits")
TOPK_KINDS = ("probs", "logprobs", "logits")
_TOP_KEYS = {"classes", "teachers", "description"}
_TOPK_TOP_KEYS = {"teachers", "description", "vocab_size"}
_TEACHER_KEYS = {"name", "classes", "outputs", "kind", "weight", "tensor"}
_TOPK_TEACHER_KEYS = {"name", "indices", "values", "kind", "weight", "vocab_map", "indices_tensor", "values_tensor"}
# safetensors dtype code -> (storage numpy dtype, torch dtype)
_SAFETENSORS_DTYPES = {
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),  # numpy has no bfloat16: read the bits, view in torch
    "F32": (np.dtype("<f4"), torch.float32),
    "F64": (np.dtype("<f8"), torch.float64),
}
_NUMPY_TO_TORCH = {np.dtype("f2"): torch.float16, np.dtype("f4"): torch.float32, np.dtype("f8"): torch.float64}
# top-k ids files
_SAFETENSORS_INTS = {
    "I16": (np.dtype("<i2"), torch.int16),
    "I32": (np.dtype("<i4"), torch.int32),
    "I64": (np.dtype("<i8"), torch.int64),
}
_NUMPY_INTS = {np.dtype("i2"): torch.int16, np.dtype("i4"): torch.int32, np.dtype("i8"): torch.int64}


class ManifestError(ValueError):
    """A manifest, or a teacher file it names, cannot be used. ``problems`` lists each one."""

    def __init__(self, problems: Sequence[str], source: str = "manifest") -> None:
        self.problems = list(problems)
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            super().__init__(head + self.problems[0])
        else:
            super().__init__(head + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class TeacherSource:
    """One teacher: its class list and its ``(B, len(classes))`` outputs in a file.

    Attributes:
        name: unique teacher name.
        classes: the class list as written in the manifest (names or union indices).
        kind: ``"probs"`` or ``"logits"``.
        weight: the teacher's weight (> 0).
        path: the resolved outputs file.
        shape: ``(B, C)`` as stored.
        dtype: the stored torch dtype (float16, bfloat16, float32 or float64; int16, int32 or
            int64 for a top-k teacher's ids).
        storage: the numpy dtype of the stored bytes (byte order included; uint16 for bfloat16).
        data_offset: byte offset of element ``[0, 0]`` in the file.
        fortran: stored column-major (``np.save`` of a transposed or column-sliced array): a chunk
            is then read as one contiguous piece per column.
    """

    name: str
    classes: tuple
    kind: str
    weight: float
    path: Path
    shape: tuple[int, int]
    dtype: torch.dtype
    storage: np.dtype
    data_offset: int
    fortran: bool = False
    _file: object = field(default=None, repr=False, compare=False)

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * self.storage.itemsize

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as a CPU tensor ``(stop - start, C)`` in the stored dtype.

        ``out``, if given, is a C-contiguous ``(>= stop - start, C)`` array of ``self.storage``'s
        itemsize to read into (e.g. a view of pinned memory); the result then shares its memory.
        """
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"teacher {self.name!r}: rows {start}:{stop} out of range for {self.shape[0]} samples")
        rows, cols = stop - start, self.shape[1]
        if out is None:
            buf = np.empty((rows, cols), dtype=self.storage)
        else:
            buf = out[:rows].view(self.storage)
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        if self.fortran:
            # Column j holds rows 0..B-1 contiguously: read each column's slice, then transpose.
            cols_first = np.empty((cols, rows), dtype=self.storage)
            for j in range(cols):
                self._read_into(cols_first[j], self.data_offset + (j * self.shape[0] + start) * self.storage.itemsize)
            buf[...] = cols_first.T
        else:
            self._read_into(buf, self.data_offset + start * self.row_bytes)
        if not buf.dtype.isnative:
            buf = buf.astype(buf.dtype.newbyteorder("="))
        tensor = torch.from_numpy(buf)
        return tensor.view(self.dtype) if self.dtype == torch.bfloat16 else tensor

    def _read_into(self, buf: np.ndarray, offset: int) -> None:
        if buf.size == 0:
            return
        view = memoryview(buf).cast("B")
        self._file.seek(offset)
        got = 0
        while got < len(view):
            n = self._file.readinto(view[got:])
            if not n:
                raise OSError(f"teacher {self.name!r}: {self.path} ended early (truncated while running?)")
            got += n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Manifest:
    """A validated job description.

    Attributes:
        teachers: one :class:`TeacherSource` per teacher, in manifest order.
        teacher_set: the :class:`~uhc_fast.problem.TeacherSet` over the union (built once).
        class_names: the union's class labels in output-column order (length K).
        num_samples: B, shared by every teacher.
        digest: sha256 of the manifest's content and the teacher files' size and mtime: a quick
            identity shown by ``uhc-fast inspect`` and recorded in the sidecar. Jobs do not use it:
            they checksum the rows each chunk reads (:mod:`uhc_fast.stream.job`).
        path: the manifest file, if it came from one.
    """

    teachers: list[TeacherSource]
    teacher_set: TeacherSet | None
    class_names: tuple
    num_samples: int
    digest: str
    path: Path | None = None
    raw: dict = field(default_factory=dict, repr=False)
    topk: bool = False
    vocab_size: int | None = None

    @property
    def num_classes(self) -> int:
        """K (for a top-k manifest: its ``vocab_size``, or 0 when it has none)."""
        if self.topk:
            return self.vocab_size or 0
        return self.teacher_set.num_classes

    @property
    def sources(self) -> list[tuple[str, TeacherSource]]:
        """The files a chunk reads, by name, in order: each teacher's outputs, or for a top-k
        manifest each teacher's ids then values (``t0.indices``, ``t0.values``, ...)."""
        if not self.topk:
            return [(t.name, t) for t in self.teachers]
        return [(f"{t.name}.{part}", getattr(t, part)) for t in self.teachers for part in ("indices", "values")]

    @property
    def slots(self) -> int:
        """Top-k: ``sum k_i``, the largest possible union of a sample."""
        return sum(t.shape[1] for t in self.teachers)

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    @property
    def kinds(self) -> set[str]:
        return {t.kind for t in self.teachers}

    @property
    def weights(self) -> list[float]:
        return [t.weight for t in self.teachers]

    @property
    def input_bytes(self) -> int:
        return sum(t.shape[0] * t.row_bytes for t in self.teachers)

    def close(self) -> None:
        for t in self.teachers:
            t.close()


@dataclass
class TopkTeacher:
    """A teacher of a top-k manifest: ``(B, k)`` ids and values files, and an optional vocabulary map.

    Attributes:
        name, kind (``probs``, ``logprobs`` or ``logits``), weight: as for dense teachers.
        indices, values: the two files, as :class:`TeacherSource` (the ids in an integer dtype).
        vocab_map: the ``(V_i,)`` int64 map from the teacher's ids to shared ids (-1: none), or None.
        map_digest: sha256 of the map's values (part of a job's identity).
    """

    name: str
    kind: str
    weight: float
    indices: TeacherSource
    values: TeacherSource
    vocab_map: np.ndarray | None = None
    map_path: Path | None = None
    map_digest: str | None = None

    # what the streaming layer reads of every teacher
    @property
    def classes(self) -> tuple:
        return ()

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def path(self) -> Path:
        return self.values.path

    @property
    def row_bytes(self) -> int:
        return self.indices.row_bytes + self.values.row_bytes

    def close(self) -> None:
        self.indices.close()
        self.values.close()


def load_manifest(source: str | os.PathLike | Mapping, base_dir: str | os.PathLike | None = None) -> Manifest:
    """Read and validate a manifest.

    Args:
        source: a path to the JSON file, or the already-parsed mapping.
        base_dir: where relative ``outputs`` paths start (default: the manifest's folder, or the
            current directory for a mapping).

    Raises:
        ManifestError: listing every problem found (missing/unreadable files, non-float or
            non-2-D arrays, column counts that differ from class lists, sample counts that differ
            between teachers, unknown or duplicate classes, bad fields).
    """
    path = None
    label = "manifest"
    if isinstance(source, Mapping):
        raw = dict(source)
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ManifestError([f"file not found ({path.resolve()})"], label)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ManifestError([f"not valid JSON: {err}"], label) from None
        base = Path(base_dir) if base_dir is not None else path.resolve().parent
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ManifestError(["the top level must be a JSON object with a 'teachers' list"], label)
    entries = raw.get("teachers")
    if isinstance(entries, list) and any(isinstance(e, dict) and ("indices" in e or "values" in e) for e in entries):
        return _load_topk(raw, base, path, label)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        problems.append(f"unknown top-level keys {unknown} (expected {sorted(_TOP_KEYS)})")
    if not isinstance(entries, list) or not entries:
        raise ManifestError([*problems, "'teachers' must be a non-empty list of objects"], label)
    union = raw.get("classes")
    if union is not None and (not isinstance(union, list) or not union):
        problems.append("'classes' must be a non-empty list of class names")
        union = None
    elif union is not None and any(not isinstance(c, str) for c in union):
        problems.append("'classes' (the union order) must list class names (strings)")
        union = None
    elif union is not None and len(set(union)) != len(union):
        dup = next(c for c in union if union.count(c) > 1)
        problems.append(f"'classes' lists {dup!r} twice")
        union = None

    teachers: list[TeacherSource] = []
    names: set[str] = set()
    stats = []
    for i, entry in enumerate(entries):
        found = _parse_teacher(i, entry, base, names, problems)
        if found is not None:
            teachers.append(found[0])
            stats.append(found[1])
    if problems:
        raise ManifestError(problems, label)

    counts = {t.shape[0] for t in teachers}
    if len(counts) > 1:
        listing = ", ".join(f"{t.name!r}: {t.shape[0]}" for t in teachers)
        problems.append(f"teachers have different sample counts ({listing}); every file needs the same rows")
    teacher_set, class_names = _build_teacher_set(teachers, union, problems)
    if problems:
        raise ManifestError(problems, label)

    digest = hashlib.sha256(
        json.dumps({"manifest": raw, "files": stats}, sort_keys=True, default=str).encode()
    ).hexdigest()
    return Manifest(teachers, teacher_set, class_names, teachers[0].shape[0], digest, path, raw)


def _parse_teacher(i: int, entry, base: Path, names: set[str], problems: list[str]):
    """One teacher entry -> (TeacherSource, file stats for the digest), or None after noting problems."""
    if not isinstance(entry, dict):
        problems.append(f"teachers[{i}] must be an object, got {type(entry).__name__}")
        return None
    name = entry.get("name", f"t{i}")
    who = f"teacher {i} ({name!r})" if "name" in entry else f"teacher {i}"
    start = len(problems)
    unknown = sorted(set(entry) - _TEACHER_KEYS)
    if unknown:
        problems.append(f"{who}: unknown keys {unknown} (expected {sorted(_TEACHER_KEYS)})")
    _check_name(name, who, names, problems)
    classes = entry.get("classes")
    if not isinstance(classes, list) or not classes:
        problems.append(f"{who}: 'classes' must be a non-empty list of class names or indices")
        classes = []
    elif any(isinstance(c, bool) or not isinstance(c, (str, int)) for c in classes):
        problems.append(f"{who}: 'classes' entries must be strings (names) or integers (union indices)")
    elif len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        problems.append(f"{who}: class {dup!r} is listed twice")
    kind = entry.get("kind")
    if kind not in KINDS:
        problems.append(f"{who}: 'kind' must be one of {KINDS}, got {kind!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (np.isfinite(weight) and weight > 0):
        problems.append(f"{who}: 'weight' must be a finite number > 0, got {weight!r}")
    outputs = entry.get("outputs")
    if not isinstance(outputs, str) or not outputs:
        problems.append(f"{who}: 'outputs' must be the path of a .npy or .safetensors file")
        return None
    tensor_name = entry.get("tensor")
    file = (base / outputs) if not os.path.isabs(outputs) else Path(outputs)
    header = _read_header(file, tensor_name, who, problems)
    if header is None or len(problems) > start:
        return None
    shape, dtype, storage, offset, fortran = header
    if len(shape) != 2:
        problems.append(f"{who}: {outputs} holds an array of shape {shape}; expected 2-D (samples, {len(classes)})")
        return None
    if classes and shape[1] != len(classes):
        problems.append(
            f"{who}: {outputs} has {shape[1]} columns but the teacher's class list has {len(classes)} entries"
        )
        return None
    st = file.stat()
    source = TeacherSource(
        str(name),
        tuple(classes),
        kind,
        float(weight),
        file,
        (int(shape[0]), int(shape[1])),
        dtype,
        storage,
        offset,
        fortran,
    )
    return source, {"outputs": outputs, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_header(file: Path, tensor_name, who: str, problems: list[str], integer: bool = False):
    """(shape, torch dtype, storage numpy dtype, data offset, column-major) of a .npy/.safetensors
    file, or None. ``integer``: the file holds ids (int16/32/64), not float outputs."""
    if not file.is_file():
        problems.append(f"{who}: outputs file not found: {file}")
        return None
    suffix = file.suffix.lower()
    try:
        with open(file, "rb") as f:
            if suffix == ".npy":
                if tensor_name is not None:
                    problems.append(f"{who}: 'tensor' only applies to .safetensors files")
                    return None
                return _npy_header(f, file, who, problems, integer)
            if suffix == ".safetensors":
                return _safetensors_header(f, file, tensor_name, who, problems, integer)
    except (OSError, ValueError) as err:
        problems.append(f"{who}: cannot read {file}: {err}")
        return None
    problems.append(f"{who}: {file.name}: outputs must be a .npy or .safetensors file")
    return None


def _check_name(name, who: str, names: set[str], problems: list[str]) -> None:
    """A teacher's name is a non-empty string no other teacher uses (``names``: those seen so far)."""
    if not isinstance(name, str) or not name:
        problems.append(f"{who}: 'name' must be a non-empty string")
    elif name in names:
        problems.append(f"{who}: the name {name!r} is used by another teacher")
    names.add(str(name))


def _npy_header(f, file: Path, who: str, problems: list[str], integer: bool = False):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:  # 2.0, and 3.0 (same layout, utf-8 text: identical for float dtypes)
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if integer:
        kind, table, what = "i", _NUMPY_INTS, "ids must be int16/32/64"
    else:
        kind, table, what = "f", _NUMPY_TO_TORCH, "teacher outputs must be float16/32/64"
    if dtype.kind != kind or dtype.itemsize not in (2, 4, 8):
        problems.append(f"{who}: {file.name} has dtype {dtype}; {what}")
        return None
    offset = f.tell()
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if file.stat().st_size < expected:
        problems.append(f"{who}: {file.name} is truncated ({file.stat().st_size} bytes, header says {expected})")
        return None
    torch_dtype = table[np.dtype(dtype.str.replace(">", "<"))]
    return tuple(int(s) for s in shape), torch_dtype, dtype, offset, bool(fortran and len(shape) == 2)


def _safetensors_header(f, file: Path, tensor_name, who: str, problems: list[str], integer: bool = False):
    head = f.read(8)
    if len(head) != 8:
        problems.append(f"{who}: {file.name} is not a safetensors file (too short)")
        return None
    (size,) = struct.unpack("<Q", head)
    if size > 100_000_000:
        problems.append(f"{who}: {file.name} is not a safetensors file (header size {size})")
        return None
    try:
        meta = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError):
        problems.append(f"{who}: {file.name} is not a safetensors file (unreadable header)")
        return None
    tensors = {k: v for k, v in meta.items() if k != "__metadata__"}
    if tensor_name is None:
        if len(tensors) != 1:
            problems.append(
                f"{who}: {file.name} holds {len(tensors)} tensors {sorted(tensors)[:5]}; name one with 'tensor'"
            )
            return None
        tensor_name = next(iter(tensors))
    if tensor_name not in tensors:
        problems.append(f"{who}: {file.name} has no tensor {tensor_name!r} (it has {sorted(tensors)[:5]})")
        return None
    info = tensors[tensor_name]
    code = info.get("dtype")
    known = _SAFETENSORS_INTS if integer else _SAFETENSORS_DTYPES
    if code not in known:
        wanted = "ids must be I16/I32/I64" if integer else "teacher outputs must be F16/BF16/F32/F64"
        problems.append(f"{who}: {file.name}[{tensor_name!r}] has dtype {code}; {wanted}")
        return None
    storage, dtype = known[code]
    begin, end = info["data_offsets"]
    shape = tuple(int(s) for s in info["shape"])
    if end - begin != int(np.prod(shape)) * storage.itemsize or file.stat().st_size < 8 + size + end:
        problems.append(f"{who}: {file.name}[{tensor_name!r}] is truncated or inconsistent with its header")
        return None
    return shape, dtype, storage, 8 + size + begin, False


def _build_teacher_set(teachers: list[TeacherSource], union, problems: list[str]):
    """The TeacherSet over the union and the class names in output order (None on problems)."""
    by_index = [all(isinstance(c, int) for c in t.classes) for t in teachers]
    by_name = [all(isinstance(c, str) for c in t.classes) for t in teachers]
    if not (all(by_index) or all(by_name)):
        mixed = [t.name for t, a, b in zip(teachers, by_index, by_name, strict=True) if not a]
        problems.append(
            f"teachers mix class names and class indices (teachers {mixed[:5]} use names); use one kind throughout"
        )
        return None, ()
    sets = [list(t.classes) for t in teachers]
    if all(by_index):
        top = max(max(cs) for cs in sets)
        for t in teachers:
            if min(t.classes) < 0:
                problems.append(f"teacher {t.name!r}: negative class index {min(t.classes)}")
            elif union is not None and max(t.classes) >= len(union):
                problems.append(
                    f"teacher {t.name!r}: class index {max(t.classes)} is out of range for the "
                    f"{len(union)} classes in 'classes'"
                )
        if problems:
            return None, ()
        k = len(union) if union is not None else top + 1
        try:
            teacher_set = TeacherSet(sets, num_classes=k if union is not None else None)
        except ValueError as err:
            problems.append(_name_teachers(str(err), teachers))
            return None, ()
        names = tuple(union) if union is not None else tuple(range(k))
        return teacher_set, names
    if union is not None:
        known = set(union)
        for t in teachers:
            unknown = [c for c in t.classes if c not in known]
            if unknown:
                problems.append(
                    f"teacher {t.name!r}: classes {unknown[:5]} are not in the manifest's fixed union 'classes'"
                )
        if problems:
            return None, ()
    try:
        teacher_set = TeacherSet(sets, classes=union)
    except ValueError as err:
        problems.append(_name_teachers(str(err), teachers))
        return None, ()
    return teacher_set, tuple(teacher_set.classes)


def _name_teachers(message: str, teachers: list[TeacherSource]) -> str:
    """TeacherSet says 'teacher 3'; the manifest's users know the teacher as its name."""
    for i, t in enumerate(teachers):
        if message.startswith(f"teacher {i}:"):
            return f"teacher {t.name!r}:" + message[len(f"teacher {i}:") :]
    return message


# ---------------------------------------------------------------------- top-k manifests
def _load_topk(raw: dict, base: Path, path: Path | None, label: str) -> Manifest:
    """A top-k manifest (teachers with ``indices`` and ``values`` files), every problem reported at once."""
    problems: list[str] = []
    unknown = sorted(set(raw) - _TOPK_TOP_KEYS)
    if unknown:
        problems.append(f"unknown top-level keys {unknown} for a top-k manifest (expected {sorted(_TOPK_TOP_KEYS)})")
    vocab_size = raw.get("vocab_size")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        problems.append(f"'vocab_size' must be an integer >= 1, got {vocab_size!r}")
        vocab_size = None
    teachers: list[TopkTeacher] = []
    names: set[str] = set()
    stats = []
    for i, entry in enumerate(raw["teachers"]):
        found = _parse_topk_teacher(i, entry, base, names, vocab_size, problems)
        if found is not None:
            teachers.append(found[0])
            stats.append(found[1])
    if not problems:
        counts = {t.shape[0] for t in teachers}
        if len(counts) > 1:
            listing = ", ".join(f"{t.name!r}: {t.shape[0]}" for t in teachers)
            problems.append(f"teachers have different sample counts ({listing}); every file needs the same rows")
        if len(teachers) > 63:
            problems.append(f"{len(teachers)} teachers: top-k jobs take at most 63")
    if problems:
        for t in teachers:
            t.close()
        raise ManifestError(problems, label)
    digest = hashlib.sha256(
        json.dumps({"manifest": raw, "files": stats}, sort_keys=True, default=str).encode()
    ).hexdigest()
    return Manifest(teachers, None, (), teachers[0].shape[0], digest, path, raw, topk=True, vocab_size=vocab_size)


def _parse_topk_teacher(i: int, entry, base: Path, names: set[str], vocab_size, problems: list[str]):
    if not isinstance(entry, dict):
        problems.append(f"teachers[{i}] must be an object, got {type(entry).__name__}")
        return None
    name = entry.get("name", f"t{i}")
    who = f"teacher {i} ({name!r})" if "name" in entry else f"teacher {i}"
    start = len(problems)
    if "classes" in entry or "outputs" in entry:
        problems.append(f"{who}: a top-k manifest's teachers give 'indices' and 'values', not 'classes' and 'outputs'")
    unknown = sorted(set(entry) - _TOPK_TEACHER_KEYS - {"classes", "outputs"})
    if unknown:
        problems.append(f"{who}: unknown keys {unknown} (expected {sorted(_TOPK_TEACHER_KEYS)})")
    _check_name(name, who, names, problems)
    kind = entry.get("kind")
    if kind not in TOPK_KINDS:
        problems.append(f"{who}: 'kind' must be one of {TOPK_KINDS}, got {kind!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (np.isfinite(weight) and weight > 0):
        problems.append(f"{who}: 'weight' must be a finite number > 0, got {weight!r}")
    files = {}
    for part in ("indices", "values"):
        where = entry.get(part)
        if not isinstance(where, str) or not where:
            problems.append(f"{who}: '{part}' must be the path of a .npy or .safetensors file")
            continue
        file = (base / where) if not os.path.isabs(where) else Path(where)
        header = _read_header(file, entry.get(f"{part}_tensor"), who, problems, integer=part == "indices")
        if header is None:
            continue
        shape, dtype, storage, offset, fortran = header
        if len(shape) != 2:
            problems.append(f"{who}: {where} holds an array of shape {shape}; expected 2-D (samples, k)")
            continue
        st = file.stat()
        files[part] = (
            TeacherSource(
                f"{name}.{part}",
                (),
                kind,
                float(weight) if isinstance(weight, (int, float)) else 1.0,
                file,
                (int(shape[0]), int(shape[1])),
                dtype,
                storage,
                offset,
                fortran,
            ),
            {"file": where, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
        )
    if len(files) == 2 and files["indices"][0].shape != files["values"][0].shape:
        problems.append(
            f"{who}: indices {files['indices'][0].shape} and values {files['values'][0].shape} differ in shape"
        )
    vocab_map, map_path, map_digest = None, None, None
    if entry.get("vocab_map") is not None:
        where = entry["vocab_map"]
        map_path = (base / where) if isinstance(where, str) and not os.path.isabs(where) else Path(str(where))
        vocab_map = _read_vocab_map(map_path, who, vocab_size, problems)
        if vocab_map is not None:
            map_digest = hashlib.sha256(vocab_map.tobytes()).hexdigest()
    if len(problems) > start:
        for source, _ in files.values():
            source.close()
        return None
    teacher = TopkTeacher(
        str(name), kind, float(weight), files["indices"][0], files["values"][0], vocab_map, map_path, map_digest
    )
    return teacher, {"indices": files["indices"][1], "values": files["values"][1], "vocab_map": map_digest}


def _read_vocab_map(file: Path, who: str, vocab_size, problems: list[str]) -> np.ndarray | None:
    """A 1-D integer .npy mapping a teacher's ids to shared ids (-1: none), checked like
    ``estimate_topk``'s ``vocab_maps``."""
    if file.suffix.lower() != ".npy" or not file.is_file():
        problems.append(f"{who}: 'vocab_map' must name an existing .npy file, got {str(file)!r}")
        return None
    try:
        mapping = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        problems.append(f"{who}: cannot read {file}: {err}")
        return None
    if mapping.ndim != 1 or mapping.dtype.kind not in "iu":
        problems.append(
            f"{who}: {file.name} holds {mapping.dtype} {mapping.shape}; a vocabulary map is a 1-D integer array"
        )
        return None
    mapping = mapping.astype(np.int64)
    if mapping.size and mapping.min() < -1:
        problems.append(f"{who}: {file.name} maps an id to {int(mapping.min())}; shared ids are >= 0, or -1 for none")
        return None
    mapped = mapping[mapping >= 0]
    if vocab_size is not None and mapped.size and mapped.max() >= vocab_size:
        problems.append(
            f"{who}: {file.name} maps an id to {int(mapped.max())}, out of range for vocab_size={vocab_size}"
        )
        return None
    if mapped.size and np.bincount(mapped).max() > 1:
        problems.append(f"{who}: {file.name} maps two ids to the same shared id; a map must be one-to-one")
        return None
    return mapping
