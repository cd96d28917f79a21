"""Bad input gets a clear exception naming the teacher, row or argument; edge cases work.

The checks of the values themselves (NaN/Inf, negative, all-zero and off-sum rows), which every
backend makes with the same errors, are in ``test_backends.py``.
"""

import numpy as np
import pytest
import torch

import uhc_fast
from uhc_fast import InputError, TeacherSet

SETS = [[0, 1, 2], [2, 3]]  # sharing one class: mf-lu warns that their scales are not both identifiable
pytestmark = pytest.mark.filterwarnings("ignore::uhc_fast.UnidentifiableScalesWarning")


def good(batch=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.softmax(torch.randn(batch, len(cs), generator=gen), dim=1).to(dtype) for cs in SETS]


def test_wrong_column_count_rank_and_batch():
    outputs = good()
    outputs[1] = outputs[1][:, :1]
    with pytest.raises(ValueError, match=r"teacher 1: outputs have 1 columns but its class set has 2"):
        uhc_fast.estimate(outputs, SETS)
    with pytest.raises(ValueError, match=r"teacher 0: outputs must be 2-D"):
        uhc_fast.estimate([good()[0][0], good()[1]], SETS)
    with pytest.raises(ValueError, match=r"teacher 1: batch size 3 differs from teacher 0's 4"):
        uhc_fast.estimate([good()[0], good()[1][:3]], SETS)
    with pytest.raises(ValueError, match=r"got outputs for 1 teachers but class sets for 2"):
        uhc_fast.estimate(good()[:1], SETS)


def test_integer_dtypes_and_non_arrays():
    with pytest.raises(TypeError, match=r"teacher 0: outputs must be float16/bfloat16/float32/float64"):
        uhc_fast.estimate([torch.ones(2, 3, dtype=torch.int64), good(2)[1]], SETS)
    with pytest.raises(TypeError, match=r"teacher 1: outputs must be floating point, got numpy int32"):
        uhc_fast.estimate([good(2)[0].numpy(), np.ones((2, 2), dtype=np.int32)], SETS)
    with pytest.raises(TypeError, match=r"teacher 0: expected a torch tensor or numpy array, got list"):
        uhc_fast.estimate([[[1.0, 0.0, 0.0]], good(1)[1]], SETS)
    with pytest.raises(TypeError, match=r"outputs must be a sequence"):
        uhc_fast.estimate(torch.ones(2, 3), SETS)


@pytest.mark.gpu
def test_mixed_devices():
    outputs = good()
    with pytest.raises(ValueError, match=r"teacher 1: on cuda:0 but teacher 0 is on cpu"):
        uhc_fast.estimate([outputs[0], outputs[1].cuda()], SETS)


def test_mixed_devices_are_checked_without_a_gpu():
    outputs = good()
    meta = torch.empty(4, 2, device="meta")
    with pytest.raises(ValueError, match=r"teacher 1: on meta but teacher 0 is on cpu"):
        uhc_fast.estimate([outputs[0], meta], SETS)


@pytest.mark.parametrize(
    ("class_sets", "kwargs", "error", "message"),
    [
        ([[0, 1], [1, 1]], {}, ValueError, r"teacher 1: class 1 is listed twice"),
        ([[0, 1], []], {}, ValueError, r"teacher 1: empty class set"),
        (
            [[0, 1], [1, 5]],
            {"num_classes": 4},
            ValueError,
            r"teacher 1: class index 5 is out of range for num_classes=4",
        ),
        ([[0, 1], [-1, 1]], {}, ValueError, r"teacher 1: negative class index -1"),
        ([[0, 1], [1, 3]], {}, ValueError, r"classes \[2\] are covered by no teacher"),
        ([[0, 1], ["a", "b"]], {}, TypeError, r"teacher 1: class sets mix indices and names"),
        ([], {}, ValueError, r"class_sets: empty"),
        ([[0, 1], 3], {}, TypeError, r"teacher 1: its class set must be a sequence"),
    ],
)
def test_bad_class_sets(class_sets, kwargs, error, message):
    with pytest.raises(error, match=message) as caught:
        TeacherSet(class_sets, **kwargs)
    if error is ValueError:  # bad values name the argument (and the teacher, where one is at fault)
        assert isinstance(caught.value, InputError) and caught.value.argument == "class_sets"
        assert caught.value.teacher == (1 if "teacher 1" in message else None)


@pytest.mark.parametrize(
    ("kwargs", "argument", "message"),
    [
        ({"backend": "tpu"}, "backend", r"backend='tpu': expected one of \('auto', 'torch', 'cpu', 'cuda', 'triton'\)"),
        (
            {"inputs": "scores"},
            "inputs",
            r"inputs='scores': expected one of \('probs', 'logits'\) \(or one per teacher\)",
        ),
        ({"inputs": ["probs", "odds"]}, "inputs[1]", r"inputs\[1\]='odds': expected one of"),
        ({"inputs": []}, "inputs", r"inputs=\[\]: expected one of \('probs', 'logits'\) or a sequence of them"),
        ({"weights": [1.0]}, "weights", r"weights: has 1 entries for 2 teachers"),
        ({"weights": [1.0, -2.0]}, "weights[1]", r"weights\[1\]=-2.0: teacher weights must be finite and > 0"),
        ({"weights": [float("inf"), 1.0]}, "weights[0]", r"weights\[0\]=inf: teacher weights must be finite and > 0"),
        ({"temperature": 0}, "temperature", r"temperature=0.0: must be finite and > 0"),
        ({"temperature": "hot"}, "temperature", r"temperature='hot': must be a real number"),
        ({"alpha": -1}, "alpha", r"alpha=-1.0: must be finite and >= 0"),
        ({"alpha": float("nan")}, "alpha", r"alpha=nan: must be finite and >= 0"),
        ({"tol": 0}, "tol", r"tol=0.0: must be finite and > 0"),
        ({"tol": True}, "tol", r"tol=True: must be a real number"),
        ({"max_iter": -1}, "max_iter", r"max_iter=-1: must be an int >= 0"),
        ({"max_iter": 2.5}, "max_iter", r"max_iter=2.5: must be an int >= 0"),
        ({"max_iter": True}, "max_iter", r"max_iter=True: must be an int >= 0"),
        ({"eps": 0.0}, "eps", r"eps=0.0: must be in \(0, 1\)"),
        ({"eps": float("nan")}, "eps", r"eps=nan: must be in \(0, 1\)"),
        ({"eps": -1}, "eps", r"eps=-1.0: must be in \(0, 1\)"),
        ({"eps": 1}, "eps", r"eps=1.0: must be in \(0, 1\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument, message):
    with pytest.raises(InputError, match=rf"^{message}") as caught:
        uhc_fast.estimate(good(), SETS, **kwargs)
    assert caught.value.argument == argument
    assert caught.value.teacher is None and caught.value.row is None


@pytest.mark.parametrize("inputs", [["probs", "logits", "probs"], ["probs"], ["logits", "logits", "logits"]])
def test_per_teacher_inputs_must_list_every_teacher(inputs):
    """A list of kinds is one per teacher, whether or not the kinds differ."""
    with pytest.raises(InputError, match=rf"^inputs: lists {len(inputs)} kinds for 2 teachers") as caught:
        uhc_fast.estimate(good(), SETS, inputs=inputs)
    assert caught.value.argument == "inputs"


def test_bad_method_is_named():
    with pytest.raises(ValueError, match=r"method='bogus': expected one of \('sd', 'ce', 'mf-p', 'mf-lf', 'mf-lu'\)"):
        uhc_fast.estimate(good(), SETS, "bogus")


def test_valid_edge_arguments():
    soft = uhc_fast.estimate(good(), SETS, "ce", max_iter=0, tol=1e300, eps=1e-300, alpha=0.0, weights=(2, 3))
    assert soft.shape == (4, 4)
    soft = uhc_fast.estimate(good(), SETS, "mf-lf", temperature=1e-3, inputs=("probs", "probs"))
    assert bool(torch.isfinite(soft).all())


def test_unavailable_backend_says_why():
    report = uhc_fast.info()
    for name in ("cpu", "cuda", "triton"):
        if not report[name]["available"]:
            with pytest.raises(RuntimeError, match=rf"backend='{name}' is not available: "):
                uhc_fast.estimate(good(), SETS, backend=name)
    assert report["torch"]["available"] is True


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv("UHC_FAST_BACKEND", "torch")
    _, info = uhc_fast.estimate(good(), SETS, return_info=True)
    assert info["backend"] == "torch"
    monkeypatch.setenv("UHC_FAST_BACKEND", "nope")
    with pytest.raises(InputError, match=r"UHC_FAST_BACKEND='nope': expected one of"):
        uhc_fast.estimate(good(), SETS)


@pytest.mark.parametrize("method", list(uhc_fast.METHODS))
def test_empty_batch_gives_empty_result(method):
    soft, info = uhc_fast.estimate(good(0), SETS, method, return_info=True)
    assert soft.shape == (0, 4)
    if "iterations" in info:
        assert info["iterations"].shape == (0,)


@pytest.mark.parametrize("method", list(uhc_fast.METHODS))
def test_extreme_logits_give_finite_output(method):
    gen = torch.Generator().manual_seed(0)
    outputs = [1e4 * torch.randn(5, len(cs), generator=gen) for cs in SETS]
    soft = uhc_fast.estimate(outputs, SETS, method, inputs="logits")
    assert bool(torch.isfinite(soft).all())
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5))


def test_class_names_define_the_union_in_order_of_appearance():
    sets = [["cat", "dog"], ["dog", "fox", "owl"]]
    teachers = TeacherSet(sets)
    assert teachers.classes == ("cat", "dog", "fox", "owl")
    assert teachers.class_sets == ((0, 1), (1, 2, 3))
    fixed = TeacherSet(sets, classes=["owl", "fox", "dog", "cat", "emu"])
    assert fixed.class_sets == ((3, 2), (2, 1, 0)) and fixed.uncovered == (4,)
    with pytest.raises(ValueError, match=r"teacher 1: classes \['owl'\] are not in classes="):
        TeacherSet(sets, classes=["cat", "dog", "fox"])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    outputs = [q[:, [0, 1]] / q[:, [0, 1]].sum(), q[:, [1, 2, 3]] / q[:, [1, 2, 3]].sum()]
    torch.testing.assert_close(uhc_fast.estimate(outputs, sets), q)


def test_teacher_set_describes_itself():
    teachers = TeacherSet([[0, 1, 2], [2, 3], [5]], num_classes=7)
    assert teachers.sizes == (3, 2, 1)
    assert teachers.uncovered == (4, 6)
    assert teachers.components == [[0, 1, 2, 3], [5]]
    assert not teachers.is_connected
    layout = teachers.layout()
    assert layout.offsets.tolist() == [0, 3, 5, 6]
    assert layout.class_index.tolist() == [0, 1, 2, 2, 3, 5]
    assert layout.teacher_index.tolist() == [0, 0, 0, 1, 1, 2]
    assert layout.class_index.dtype == torch.int64
    assert "num_teachers=3" in repr(teachers)
    with pytest.raises(ValueError, match=r"num_classes=9 disagrees with the TeacherSet's 7"):
        uhc_fast.estimate([torch.ones(1, 3) / 3, torch.ones(1, 2) / 2, torch.ones(1, 1)], teachers, num_classes=9)


def test_info_reports_every_backend():
    report = uhc_fast.info()
    for name in ("torch", "cpu", "cuda", "triton"):
        assert isinstance(report[name]["available"], bool)
        if not report[name]["available"]:
            assert report[name]["reason"]
    assert report["auto"]["cpu"] in ("cpu", "torch")
