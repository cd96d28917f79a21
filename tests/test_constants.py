"""What is written in two languages says the same in both: the method codes, the solver constants,
the structure buffer's layout and the codes of the launch (Python against the compiled module and,
where they expose them, the Triton kernels)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest
import torch

from uhc_fast import constants, methods, problem
from uhc_fast.backends import native_launch
from uhc_fast.inputs import CHECKS

try:
    module = native_launch.load_module("cpu")
except ImportError as err:  # pragma: no cover - installed without the extension
    pytest.skip(f"CPU extension not built: {err}", allow_module_level=True)

# the solver constants both languages hold (csrc/core/constants.h)
SHARED_CONSTANTS = (
    "DEFAULT_MAX_ITER",
    "ARMIJO",
    "MAX_HALVINGS",
    "MAX_LOG_STEP",
    "CONVERGED_LOG_STEP",
    "CHANGE_ROUNDING",
    "MIN_SCALE",
)


def test_method_codes():
    assert dict(module.method_codes) == {name: m.code for name, m in methods.METHODS.items()}
    assert sorted(m.code for m in methods.METHODS.values()) == list(range(len(methods.NAMES)))
    assert methods.ITERATIVE == tuple(n for n in methods.NAMES if methods.get(n).iterative)
    with pytest.raises(ValueError, match=r"method='nope': expected one of \('sd', 'ce', 'mf-p', 'mf-lf', 'mf-lu'\)"):
        methods.get("nope")


def test_solver_constants():
    compiled = dict(module.constants)
    assert set(compiled) == set(SHARED_CONSTANTS)
    for name in SHARED_CONSTANTS:
        python = getattr(constants, name)
        assert compiled[name] == python and type(compiled[name]) is type(python), name


def test_structure_layout():
    assert tuple(module.structure_sections) == tuple(name for name, _ in problem.STRUCTURE_SECTIONS)
    assert module.structure_header == len(problem.STRUCTURE_HEADER)
    # the prior teacher's mark in the scale_anchor section
    teachers = problem.TeacherSet([[0, 1, 2], [2, 3]]).with_prior()
    layout = teachers.layout()
    sizes = dict(zip(problem.STRUCTURE_HEADER, layout.structure[: len(problem.STRUCTURE_HEADER)].tolist()))
    assert (sizes["N"], sizes["K"], sizes["nnz"]) == (3, 4, 9)
    lengths = {
        "N + 1": sizes["N"] + 1,
        "nnz": sizes["nnz"],
        "K + 1": sizes["K"] + 1,
        "K": sizes["K"],
        "G + 1": sizes["G"] + 1,
        "E": sizes["E"],
        "N": sizes["N"],
        "N (N - 1) / 2 + 1": sizes["N"] * (sizes["N"] - 1) // 2 + 1,
        "P": sizes["P"],
    }
    at = len(problem.STRUCTURE_HEADER)
    sections = {}
    for name, length in problem.STRUCTURE_SECTIONS:
        sections[name] = layout.structure[at : at + lengths[length]].tolist()
        at += lengths[length]
    assert at == layout.structure.numel()  # the sections fill the buffer exactly
    assert sections["scale_anchor"][teachers.prior] == module.prior_teacher_mark
    assert sections["offsets"] == layout.offsets.tolist()
    assert sections["class_index"] == layout.class_index.tolist()


def test_launch_codes():
    """The dtype, kind and check codes of csrc/core/input.h."""
    assert native_launch.DTYPE_CODES == {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
    assert native_launch.KIND_CODES == {"probs": 0, "logits": 1}
    assert CHECKS == ("not finite", "negative", "all zero", "sum off")
    assert set(constants.SUM_TOLERANCE) == set(native_launch.DTYPE_CODES)


def test_kernel_constants():
    """The Triton kernels receive the solver settings as arguments or hold copies; any copy they
    expose under a shared name must agree."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    try:
        kernels = importlib.import_module("uhc_fast.kernels")
    except ImportError as err:
        pytest.skip(f"uhc_fast.kernels does not import: {type(err).__name__}: {err}")
    names = (*SHARED_CONSTANTS, "DEFAULT_EPS", "DEFAULT_DISCONNECTED_ALPHA")
    found = {}
    holders = [kernels] + [
        importlib.import_module(f"uhc_fast.kernels.{module.name}") for module in pkgutil.iter_modules(kernels.__path__)
    ]
    for holder in holders:
        for name in names:
            if hasattr(holder, name):
                found[f"{holder.__name__}.{name}"] = (getattr(holder, name), getattr(constants, name))
    assert found, "no kernel module holds a copy of the solver constants: drop this test, or find them"
    for where, (theirs, ours) in found.items():
        assert theirs == ours, where
