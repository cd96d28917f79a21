"""The estimate / inspect / info subcommands, and the progress bar."""

from __future__ import annotations

import json

import numpy as np
import pytest

from uhc_fast import commands

from .test_stream import chunked_reference, make_job


def test_estimate_command_writes_the_streamed_result(tmp_path, capsys):
    manifest, _ = make_job(tmp_path, batch=90)
    out = tmp_path / "res" / "soft.npy"
    code = commands.main(["estimate", str(manifest), "--method", "mf-p", "--out", str(out), "--chunk-size", "40"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and "3 chunks" in err and "samples/s" in err
    np.testing.assert_array_equal(np.load(out), chunked_reference(manifest, "mf-p", 40).astype(np.float32))
    assert json.loads((tmp_path / "res" / "soft.json").read_text())["method"] == "mf-p"
    # The same command again: nothing to do.
    assert commands.main(["estimate", str(manifest), "--method", "mf-p", "--out", str(out)]) == 0
    assert "already complete" in capsys.readouterr().err


def test_estimate_command_options_reach_the_job(tmp_path, capsys):
    manifest, _ = make_job(tmp_path, batch=50)
    out = tmp_path / "soft.npy"
    argv = [
        "estimate",
        str(manifest),
        "--out",
        str(out),
        "--dtype",
        "float16",
        "--top-k",
        "2",
        "--method",
        "sd",
        "--temperature",
        "2",
        "--alpha",
        "0.5",
        "--no-progress",
    ]
    assert commands.main(argv) == 0
    side = json.loads((tmp_path / "soft.json").read_text())
    assert side["parameters"]["temperature"] == 2.0 and side["parameters"]["alpha"] == 0.5
    assert side["parameters"]["top_k"] == 2 and side["dtype"] == "float16"
    assert np.load(out).dtype == np.float16 and np.load(tmp_path / "soft.indices.npy").shape == (50, 2)


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["--chunk-size", "0"], "chunk_size=0"),
        (["--top-k", "99"], "top_k=99"),
        (["--device", "tpu"], "device="),
    ],
)
def test_estimate_command_errors_exit_2(tmp_path, capsys, argv_tail, message):
    manifest, _ = make_job(tmp_path, batch=10)
    code = commands.main(["estimate", str(manifest), "--out", str(tmp_path / "s.npy"), *argv_tail])
    assert code == commands.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("uhc-fast estimate: error: ") and message in err
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "s.npy.partial").exists()


def test_estimate_command_refuses_to_overwrite(tmp_path, capsys):
    manifest, _ = make_job(tmp_path, batch=10)
    out = tmp_path / "s.npy"
    out.write_bytes(b"precious")
    assert commands.main(["estimate", str(manifest), "--out", str(out)]) == commands.EXIT_ERROR
    assert "pass --force" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert commands.main(["estimate", str(manifest), "--out", str(out), "--force", "--method", "sd"]) == 0


def test_estimate_command_reports_manifest_problems(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps({"teachers": [{"classes": ["a"], "outputs": "x.npy"}]}))
    assert commands.main(["estimate", str(tmp_path / "m.json"), "--out", str(tmp_path / "s.npy")]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "'kind' must be one of" in err and "outputs file not found" in err


def test_inspect_text_and_json(tmp_path, capsys):
    # Two disconnected groups of classes and one declared class nobody covers.
    manifest, _ = make_job(tmp_path, batch=12, class_sets=[[0, 1], [1, 2], [3, 4]], kinds=("probs",) * 3)
    raw = json.loads(manifest.read_text())
    raw["classes"].append("ghost")
    manifest.write_text(json.dumps(raw))
    assert commands.main(["inspect", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert "samples   12" in text and "6 in the union" in text and "DISCONNECTED into 2 components" in text
    assert "uncovered (zero mass): ['ghost']" in text
    assert commands.main(["inspect", str(manifest), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["samples"] == 12 and d["classes"] == 6 and len(d["teachers"]) == 3
    assert d["connectivity"] == {
        "connected": False,
        "components": 2,
        "component_sizes": [3, 2],
        "smallest_components": [["class3", "class4"]],
    }
    assert d["coverage"]["uncovered"] == ["ghost"] and d["coverage"]["max_teachers_per_class"] == 2
    assert d["size"]["input_bytes"] == 12 * 6 * 4 and d["size"]["output_bytes"]["float16"] == 12 * 6 * 2


def test_inspect_reports_errors(tmp_path, capsys):
    assert commands.main(["inspect", str(tmp_path / "nope.json")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_info_text_and_json(capsys):
    assert commands.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends:" in text and "torch   available" in text and "auto picks:" in text
    assert commands.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["torch"]["available"] is True and "cpu" in d["auto"] and "gloo" in d["distributed"]


def test_full_cli_has_these_commands():
    pytest.importorskip("uhc_fast.demo", reason="uhc_fast.cli also imports uhc_fast.demo")
    from uhc_fast import cli

    parser = cli.build_parser()
    for argv in (["estimate", "m.json", "--out", "s.npy"], ["inspect", "m.json"], ["info"]):
        args = parser.parse_args(argv)
        assert args.command == argv[0] and args.func is getattr(commands, f"cmd_{argv[0]}")


# ---------------------------------------------------------------------- progress
def test_progress_bar_only_on_request_off_a_terminal(tmp_path, capsys):
    manifest, _ = make_job(tmp_path, batch=90)
    argv = ["estimate", str(manifest), "--method", "sd", "--chunk-size", "30"]
    assert commands.main([*argv, "--out", str(tmp_path / "quiet.npy")]) == 0
    quiet = capsys.readouterr().err
    assert "%|" not in quiet and quiet.startswith("wrote ")
    assert commands.main([*argv, "--out", str(tmp_path / "loud.npy"), "--progress"]) == 0
    loud = capsys.readouterr().err
    assert "sd: 100%|" in loud and "90.0/90.0 [" in loud and " samples/s]" in loud
    assert commands.main([*argv, "--out", str(tmp_path / "none.npy"), "--no-progress"]) == 0
    assert "%|" not in capsys.readouterr().err


def test_progress_of_a_resumed_job_starts_at_the_finished_samples(tmp_path, capsys):
    manifest, _ = make_job(tmp_path, batch=90)
    good = np.load(tmp_path / "teacher1.npy")
    bad = good.copy()
    bad[70, 0] = np.nan  # in the third chunk
    np.save(tmp_path / "teacher1.npy", bad)
    argv = ["estimate", str(manifest), "--method", "sd", "--chunk-size", "30", "--out", str(tmp_path / "s.npy")]
    assert commands.main(argv) == commands.EXIT_ERROR
    assert "teacher 1 ('t1'), sample 70: outputs contain NaN or Inf" in capsys.readouterr().err
    np.save(tmp_path / "teacher1.npy", good)
    assert commands.main([*argv, "--resume", "--progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("\rsd:  67%|") and "60.0/90.0 [" in err  # the bar starts at the two chunks kept
    assert "sd: 100%|" in err
    assert "3 chunks, 2 were already done" in err
