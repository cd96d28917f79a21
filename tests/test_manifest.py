"""Manifest loading: the union, reading row ranges from .npy/.safetensors, and every up-front error."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from uhc_fast.stream import ManifestError, load_manifest


def write_npy_job(folder: Path, teachers: list[dict], arrays: list[np.ndarray], classes=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t, a in zip(teachers, arrays, strict=True):
        np.save(folder / t["outputs"], a)
    body = {"teachers": teachers} if classes is None else {"classes": classes, "teachers": teachers}
    (folder / "m.json").write_text(json.dumps(body))
    return folder / "m.json"


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A minimal safetensors writer (header JSON + raw little-endian data), for tests only."""
    codes = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def probs(rng, rows, cols, dtype=np.float32):
    x = rng.random((rows, cols)) + 0.05
    return (x / x.sum(1, keepdims=True)).astype(dtype)


def test_named_classes_union_in_first_appearance_order(tmp_path):
    rng = np.random.default_rng(0)
    teachers = [
        {"name": "a", "classes": ["cat", "dog"], "outputs": "a.npy", "kind": "probs"},
        {"name": "b", "classes": ["dog", "fox", "owl"], "outputs": "b.npy", "kind": "logits", "weight": 2},
    ]
    m = load_manifest(write_npy_job(tmp_path, teachers, [probs(rng, 7, 2), probs(rng, 7, 3)]))
    assert m.class_names == ("cat", "dog", "fox", "owl") and m.num_classes == 4
    assert m.num_samples == 7 and m.teacher_set.class_sets == ((0, 1), (1, 2, 3))
    assert m.weights == [1.0, 2.0] and m.kinds == {"probs", "logits"}
    assert m.teacher_set.is_connected


def test_fixed_union_order_and_uncovered_classes(tmp_path):
    rng = np.random.default_rng(1)
    teachers = [{"name": "a", "classes": ["dog", "cat"], "outputs": "a.npy", "kind": "probs"}]
    m = load_manifest(write_npy_job(tmp_path, teachers, [probs(rng, 3, 2)], classes=["cat", "emu", "dog"]))
    assert m.class_names == ("cat", "emu", "dog")
    assert m.teacher_set.class_sets == ((2, 0),) and m.teacher_set.uncovered == (1,)


def test_index_classes_with_and_without_union_names(tmp_path):
    rng = np.random.default_rng(2)
    teachers = [
        {"classes": [0, 1], "outputs": "a.npy", "kind": "probs"},
        {"classes": [1, 2], "outputs": "b.npy", "kind": "probs"},
    ]
    path = write_npy_job(tmp_path, teachers, [probs(rng, 4, 2), probs(rng, 4, 2)])
    m = load_manifest(path)
    assert m.class_names == (0, 1, 2) and [t.name for t in m.teachers] == ["t0", "t1"]
    named = load_manifest({"classes": ["x", "y", "z", "w"], "teachers": teachers}, base_dir=tmp_path)
    assert named.class_names == ("x", "y", "z", "w") and named.teacher_set.uncovered == (3,)


@pytest.mark.parametrize("layout", ["C", "F", "big-endian", "float16", "float64"])
def test_read_rows_matches_numpy(tmp_path, layout):
    rng = np.random.default_rng(3)
    arr = probs(rng, 37, 5, np.float16 if layout == "float16" else np.float64 if layout == "float64" else np.float32)
    if layout == "F":
        arr = np.asfortranarray(arr)
    if layout == "big-endian":
        arr = arr.astype(">f4")
    m = load_manifest(
        write_npy_job(tmp_path, [{"classes": [0, 1, 2, 3, 4], "outputs": "a.npy", "kind": "probs"}], [arr])
    )
    src = m.teachers[0]
    assert src.fortran == (layout == "F")
    for start, stop in [(0, 37), (5, 19), (36, 37), (10, 10)]:
        got = src.read(start, stop)
        assert got.shape == (stop - start, 5) and got.is_contiguous()
        np.testing.assert_array_equal(got.numpy(), arr[start:stop].astype(arr.dtype.newbyteorder("=")))
    with pytest.raises(IndexError, match="out of range"):
        src.read(30, 38)
    m.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_outputs(tmp_path, dtype):
    x = torch.softmax(torch.randn(11, 3, generator=torch.Generator().manual_seed(0)), 1).to(dtype)
    write_safetensors(tmp_path / "a.safetensors", {"probs": x, "other": torch.zeros(2, 2)})
    base = {"classes": ["p", "q", "r"], "outputs": "a.safetensors", "kind": "probs"}
    with pytest.raises(ManifestError, match="holds 2 tensors"):
        load_manifest({"teachers": [base]}, base_dir=tmp_path)
    m = load_manifest({"teachers": [{**base, "tensor": "probs"}]}, base_dir=tmp_path)
    src = m.teachers[0]
    assert src.dtype == dtype and src.shape == (11, 3)
    assert torch.equal(src.read(2, 9), x[2:9])
    with pytest.raises(ManifestError, match="no tensor 'nope'"):
        load_manifest({"teachers": [{**base, "tensor": "nope"}]}, base_dir=tmp_path)


def _one(tmp_path, **change):
    """A valid single-teacher manifest dict with ``change`` applied to the teacher."""
    rng = np.random.default_rng(4)
    np.save(tmp_path / "a.npy", probs(rng, 6, 3))
    return {"teachers": [{"name": "a", "classes": ["x", "y", "z"], "outputs": "a.npy", "kind": "probs", **change}]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"outputs": "missing.npy"}, r"teacher 0 \('a'\): outputs file not found: .*missing\.npy"),
        ({"classes": ["x", "y"]}, r"a\.npy has 3 columns but the teacher's class list has 2 entries"),
        ({"kind": "prob"}, r"'kind' must be one of \('probs', 'logits'\), got 'prob'"),
        ({"kind": None}, r"'kind' must be one of"),
        ({"weight": 0}, r"'weight' must be a finite number > 0"),
        ({"classes": ["x", "y", "x"]}, r"class 'x' is listed twice"),
        ({"classes": ["x", 1, "z"]}, r"mix class names and class indices"),
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
        ({"outputs": "a.txt"}, r"outputs file not found"),
        ({"tensor": "t"}, r"'tensor' only applies to \.safetensors"),
    ],
)
def test_teacher_entry_errors(tmp_path, change, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(_one(tmp_path, **change), base_dir=tmp_path)


def test_file_content_errors(tmp_path):
    base = _one(tmp_path)
    np.save(tmp_path / "ints.npy", np.ones((6, 3), dtype=np.int64))
    with pytest.raises(ManifestError, match=r"has dtype int64; teacher outputs must be float16/32/64"):
        load_manifest(_one(tmp_path, outputs="ints.npy"), base_dir=tmp_path)
    np.save(tmp_path / "flat.npy", np.ones(18, dtype=np.float32))
    with pytest.raises(ManifestError, match=r"shape \(18,\); expected 2-D"):
        load_manifest(_one(tmp_path, outputs="flat.npy"), base_dir=tmp_path)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-8])
    with pytest.raises(ManifestError, match="truncated"):
        load_manifest(_one(tmp_path, outputs="cut.npy"), base_dir=tmp_path)
    (tmp_path / "junk.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(_one(tmp_path, outputs="junk.npy"), base_dir=tmp_path)
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(ManifestError, match=r"must be a \.npy or \.safetensors file"):
        load_manifest(_one(tmp_path, outputs="x.txt"), base_dir=tmp_path)
    assert load_manifest(base, base_dir=tmp_path).num_samples == 6


def test_sample_counts_must_agree(tmp_path):
    rng = np.random.default_rng(5)
    teachers = [
        {"name": "a", "classes": [0, 1], "outputs": "a.npy", "kind": "probs"},
        {"name": "b", "classes": [1, 2], "outputs": "b.npy", "kind": "probs"},
    ]
    path = write_npy_job(tmp_path, teachers, [probs(rng, 5, 2), probs(rng, 6, 2)])
    with pytest.raises(ManifestError, match=r"different sample counts \('a': 5, 'b': 6\)"):
        load_manifest(path)


def test_unknown_class_in_fixed_union(tmp_path):
    body = _one(tmp_path)
    body["classes"] = ["x", "y"]
    with pytest.raises(ManifestError, match=r"teacher 'a': classes \['z'\] are not in the manifest's fixed union"):
        load_manifest(body, base_dir=tmp_path)
    body["classes"] = ["x", "y", "x"]
    with pytest.raises(ManifestError, match="'classes' lists 'x' twice"):
        load_manifest(body, base_dir=tmp_path)
    idx = {"classes": ["p", "q"], "teachers": [{"classes": [0, 1, 2], "outputs": "a.npy", "kind": "probs"}]}
    with pytest.raises(ManifestError, match="class index 2 is out of range for the 2 classes"):
        load_manifest(idx, base_dir=tmp_path)


def test_every_problem_is_reported_at_once(tmp_path):
    body = _one(tmp_path)
    body["teachers"].append({"name": "a", "classes": ["q"], "outputs": "nope.npy", "kind": "raw"})
    body["extra"] = 1
    with pytest.raises(ManifestError) as info:
        load_manifest(body, base_dir=tmp_path)
    text = str(info.value)
    assert len(info.value.problems) == 4
    for needle in (
        "unknown top-level keys ['extra']",
        "name 'a' is used by another teacher",
        "'kind' must be",
        "outputs file not found",
    ):
        assert needle in text


def test_manifest_file_errors(tmp_path):
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"teachers": [')
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ManifestError, match="top level must be a JSON object"):
        load_manifest(tmp_path / "list.json")
    (tmp_path / "empty.json").write_text('{"teachers": []}')
    with pytest.raises(ManifestError, match="'teachers' must be a non-empty list"):
        load_manifest(tmp_path / "empty.json")


def test_paths_are_relative_to_the_manifest(tmp_path):
    body = _one(tmp_path)
    (tmp_path / "sub").mkdir()
    body["teachers"][0]["outputs"] = "../a.npy"
    (tmp_path / "sub" / "m.json").write_text(json.dumps(body))
    assert load_manifest(tmp_path / "sub" / "m.json").teachers[0].path.resolve() == (tmp_path / "a.npy").resolve()


def test_digest_tracks_content_and_files_not_formatting(tmp_path):
    body = _one(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(body))
    first = load_manifest(tmp_path / "m.json").digest
    (tmp_path / "m.json").write_text(json.dumps(body, indent=4))
    assert load_manifest(tmp_path / "m.json").digest == first
    body["teachers"][0]["weight"] = 3.0
    (tmp_path / "m.json").write_text(json.dumps(body))
    assert load_manifest(tmp_path / "m.json").digest != first
    body["teachers"][0]["weight"] = 1.0
    (tmp_path / "m.json").write_text(json.dumps(body))
    np.save(tmp_path / "a.npy", np.full((6, 3), 1 / 3, dtype=np.float32))  # rewritten outputs
    os.utime(tmp_path / "a.npy", ns=(10**9, 10**9))  # (file system clocks can be coarser than this test)
    assert load_manifest(tmp_path / "m.json").digest != first
