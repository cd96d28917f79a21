"""`uhc-fast demo`: the pieces, the command end to end, and the paper's claim on the quick config."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import uhc_fast

pytest.importorskip("sklearn")
from uhc_fast import demo

# The smallest run that exercises every step: one split, four sources, a few epochs.
TINY = ["--splits", "1", "--teachers", "4", "--epochs", "3", "--methods", "sd,ce,mf-lf", "-q"]


def test_import_uhc_fast_needs_neither_sklearn_nor_matplotlib():
    code = "import sys, uhc_fast, uhc_fast.demo; print('sklearn' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_demo_uses_only_the_public_api():
    """The demo is a client layer: from uhc_fast it imports public names only, never internals."""
    for path in Path(demo.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name}: relative import outside uhc_fast.demo"
            elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "uhc_fast":
                assert node.module == "uhc_fast", f"{path.name} imports {node.module}"
                assert {a.name for a in node.names} <= set(uhc_fast.__all__), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "uhc_fast" for a in node.names), path.name


def test_python_m_uhc_fast_demo():
    proc = subprocess.run([sys.executable, "-m", "uhc_fast.demo", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--quick" in proc.stdout


def test_class_sets_cover_every_class_twice_and_connect():
    config = demo.DemoConfig()
    for seed in range(20):
        sets = demo.draw_class_sets(np.random.default_rng(seed), config)
        assert len(sets) == config.teachers
        assert all(config.min_classes <= len(s) <= config.max_classes for s in sets)
        coverage = np.bincount([c for s in sets for c in s], minlength=demo.NUM_CLASSES)
        assert coverage.min() >= 2
        assert uhc_fast.TeacherSet(sets).is_connected


def test_split_is_disjoint_and_sources_hold_only_their_classes():
    x, y = demo.load_digits_data()
    assert x.shape == (1797, 64) and 0 <= x.min() and x.max() <= 1
    config = demo.DemoConfig()
    data = demo.make_split(y, config, 0)
    parts = [data.test, data.pool, data.unlabelled]
    assert sum(len(p) for p in parts) == len(y)
    assert len(np.unique(np.concatenate(parts))) == len(y)
    for i, classes in enumerate(data.class_sets):
        assert np.isin(y[data.pool[data.owner == i]], classes).all()
    again = demo.make_split(y, config, 0)
    assert np.array_equal(again.unlabelled, data.unlabelled) and again.class_sets == data.class_sets


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"splits": 0}, "splits"),
        ({"teachers": 1}, "teachers"),
        ({"min_classes": 5, "max_classes": 4}, "min_classes"),
        ({"teachers": 2, "max_classes": 4}, "cannot cover"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"methods": ("ce", "nope")}, "nope"),
    ],
)
def test_config_errors_name_the_argument(overrides, message):
    with pytest.raises(ValueError, match=message):
        demo.DemoConfig(**overrides)


def test_demo_command_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert demo.main([*TINY, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for row in ("centralised", "| sd |", "| ce |", "| mf-lf |", "UHCLoss"):
        assert row in printed
    png = (tmp_path / "uhc_demo.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    numbers = json.loads((tmp_path / "uhc_demo.json").read_text())
    (split,) = numbers["splits"]
    assert set(split["student_accuracy"]) == {"centralised", "sd", "ce", "mf-lf", "ce-direct"}
    assert set(split["label_accuracy"]) == {"sd", "ce", "mf-lf"}
    assert all(0 <= a <= 1 for a in split["student_accuracy"].values())


def test_demo_is_registered_in_the_cli(tmp_path):
    from uhc_fast import cli

    args = cli.build_parser().parse_args(["demo", "--quick", "--seed", "3", "--no-balance", "--out", str(tmp_path)])
    config = demo.config_from_args(args)
    assert config == demo.DemoConfig.quick(seed=3, balance=False)
    assert args.func is not None


def test_same_seed_same_numbers_and_progress_counts_every_step(capsys):
    config = demo.DemoConfig(splits=1, teachers=4, student_epochs=2, teacher_epochs=2, methods=("sd", "ce"))
    first = demo.run(config, progress=True)
    # 4 teachers + the centralised model + 2 soft-label students + the UHCLoss student
    assert "8/8" in capsys.readouterr().err
    second = demo.run(config, progress=False)
    assert capsys.readouterr().err == ""
    assert first.splits[0].student_accuracy == second.splits[0].student_accuracy
    assert first.splits[0].label_accuracy == second.splits[0].label_accuracy


@pytest.mark.slow
def test_quick_demo_shows_the_papers_claim():
    """ce and the MF methods beat sd clearly; the best is within a few points of centralised."""
    result = demo.run(demo.DemoConfig.quick(), progress=False)
    central = result.student(demo.CENTRALISED).mean()
    sd = result.student("sd").mean()
    for method in ("ce", "mf-p", "mf-lf", "mf-lu", demo.DIRECT):
        assert result.student(method).mean() > sd + 0.03, method
        if method != demo.DIRECT:
            assert result.labels(method).mean() > result.labels("sd").mean() + 0.03, method
    best = max(result.student(m).mean() for m in (*result.config.methods, demo.DIRECT))
    assert best > central - 0.05
    # The soft labels are what the students learn from: their argmax must be far above chance.
    assert result.labels("ce").mean() > 0.8


def test_quick_config_is_smaller():
    config = demo.DemoConfig.quick()
    assert config.splits == 2 and config.student_epochs < demo.DemoConfig().student_epochs
