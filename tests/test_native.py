"""What only the compiled backends have: instruction-set variants, the CUDA launcher's grids run on
the CPU (its thread grid, and its teams of a warp or a block a sample with threads as lanes), the launch's
argument checks, native validation, threads and what ``info()`` says.

The answers' agreement with the torch reference, the dtypes, strides and validation errors every
backend shares are ``test_backends.py``'s. Numbers from the SIMD lanes and from the one-lane
(CUDA-emulation) path are not bit-identical: they agree to rounding, and in iterations to +-1.
"""

from __future__ import annotations

import pytest
import torch

import uhc_fast
from uhc_fast import methods
from uhc_fast.backends import native_launch
from uhc_fast.constants import compute_dtype
from uhc_fast.inputs import CHECKS, convert
from uhc_fast.options import Options
from uhc_fast.problem import STRUCTURE_HEADER

from .problems import FLOAT_DTYPES, Case, make, max_diff, tolerance

try:
    module = native_launch.load_module("cpu")
except ImportError as err:  # pragma: no cover - installed without the extension
    pytest.skip(f"CPU extension not built: {err}", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::uhc_fast.UnidentifiableScalesWarning")

SUPPORTED_ISAS = sorted(name for name, entry in module.isas().items() if entry["supported"])


def arguments(problem, method: str, dtype=torch.float64, outputs=None) -> tuple:
    """``launch_cpu``'s positional arguments for ``problem``, as the cpu backend builds them."""
    options = Options(
        method=method,
        inputs=problem.inputs,
        weights=problem.weights,
        temperature=problem.temperature,
        alpha=problem.alpha,
    )
    batch = convert(problem.tensors(dtype) if outputs is None else outputs, problem.teachers(), options)
    teachers, spec = batch.solved_teachers, methods.get(method)
    layout = teachers.layout("cpu")
    out_dtype = compute_dtype(batch.compute_dtype)
    weights = batch.solved_weights(torch.float64, "cpu").contiguous()
    system = layout.mf_lf_system(weights, torch.float64) if spec.needs_system else weights.new_zeros(0, 0)
    kinds = [native_launch.KIND_CODES[k] for k in batch.kinds]
    kinds += [native_launch.KIND_CODES["probs"]] * (teachers.num_teachers - len(kinds))
    return (batch.tensors, kinds, layout.structure, weights, system, method, out_dtype, options.temperature,
            options.eps, options.tol_for(out_dtype), options.iteration_cap())  # fmt: skip


def case(seed: int = 0, **spec):
    spec = {"batch": 13, "classes": 17, "teachers": 5, "noise": 0.3, "link": 3, "coverage": 0.5, **spec}
    return make(seed, **spec)


CASES = {  # weights and the alpha prior (a teacher without data), logits at a temperature
    "probs": dict(seed=1, weights=True, alpha=0.02),
    "logits": dict(seed=2, inputs="logits", temperature=2.5, sets="windows"),
}


def assert_rounding_close(method, dtype, got, expected, what: str) -> None:
    """Two runs of the same solver: soft labels to rounding, iterations to +-1, the same flags."""
    soft, iterations, converged = got[:3]
    assert soft.dtype == expected[0].dtype and soft.shape == expected[0].shape
    err = max_diff(soft, expected[0])
    assert err <= tolerance(method, dtype, "rounding"), f"{what}: max |q - q'| = {err:.3g}"
    if methods.get(method).iterative:
        assert max_diff(iterations, expected[1]) <= 1, what
        agree = converged == expected[2]
        assert int(agree.sum()) >= len(agree) - 1, f"{what}: converged {converged.tolist()} vs {expected[2].tolist()}"
    torch.testing.assert_close(got[-1], expected[-1], atol=0, rtol=0)  # no validation errors: all -1


# ---------------------------------------------------------------------------------------- instruction sets
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("method", methods.NAMES)
def test_instruction_sets_agree(method, dtype, case_name):
    args = arguments(case(**CASES[case_name]), method, dtype)
    baseline = native_launch.launch_cpu(*args, isa="baseline")
    assert bool((baseline[-1] == -1).all())
    for isa in SUPPORTED_ISAS:
        got = native_launch.launch_cpu(*args, isa=isa)
        assert_rounding_close(method, dtype, got, baseline, f"{isa} vs baseline")
    # the default is the widest supported variant, and what the cpu backend runs
    default = native_launch.launch_cpu(*args)
    assert module.default_isa() in SUPPORTED_ISAS
    assert torch.equal(default[0], native_launch.launch_cpu(*args, isa=module.default_isa())[0])


def test_instruction_set_choice(monkeypatch):
    built = module.isas()
    assert "baseline" in built and built["baseline"]["supported"]
    for entry in built.values():
        assert entry["lanes"] >= 1 and isinstance(entry["supported"], bool)
    widest = [name for name, entry in built.items() if entry["supported"]][-1]  # listed narrowest first
    monkeypatch.delenv("UHC_FAST_CPU_ISA", raising=False)
    assert module.default_isa() == widest
    monkeypatch.setenv("UHC_FAST_CPU_ISA", "baseline")
    assert module.default_isa() == "baseline"
    monkeypatch.setenv("UHC_FAST_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match=r"instruction set 'sse9' was not built"):
        module.default_isa()
    monkeypatch.delenv("UHC_FAST_CPU_ISA")
    args = arguments(case(), "ce")
    with pytest.raises(ValueError, match=r"instruction set 'sse9' was not built"):
        native_launch.launch_cpu(*args, isa="sse9")
    for name, entry in built.items():
        if not entry["supported"]:
            with pytest.raises(ValueError, match=rf"instruction set '{name}' is not supported by this processor"):
                native_launch.launch_cpu(*args, isa=name)


def test_a_forced_instruction_set_runs_in_a_fresh_process():
    import subprocess
    import sys

    code = (
        "import uhc_fast, torch; r = uhc_fast.info()['cpu']; print(r['isa'], r['lanes']);"
        "outputs = [torch.tensor([[0.25, 0.75]]), torch.tensor([[0.5, 0.5]])];"
        "s = uhc_fast.estimate(outputs, [[0, 1], [1, 2]], backend='cpu');"
        "print(round(float(s.sum()), 6))"
    )
    env = {**__import__("os").environ, "UHC_FAST_CPU_ISA": "baseline"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    isa, lanes, total = out.stdout.split()
    assert (isa, int(lanes), float(total)) == ("baseline", module.isas()["baseline"]["lanes"], 1.0)


# ---------------------------------------------------------------------------------------- the CUDA grid on the CPU
# the methods the CUDA launcher runs by teams (a warp or a block a sample), and a thread a sample
TEAM_METHODS = [name for name in methods.NAMES if methods.get(name).code in module.team_shapes]
THREAD_METHODS = [name for name in methods.NAMES if name not in TEAM_METHODS]


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("method", THREAD_METHODS)
def test_cuda_grid_on_cpu_matches_the_cpu_backend(method, dtype, case_name):
    """The GPU's per-thread path (one lane per thread, scratch interleaved across threads, a
    grid-stride loop) on the CPU: the same answer for any grid, including grids with fewer threads
    than samples and with idle threads, and the CPU backend's to rounding."""
    problem = case(**CASES[case_name])
    args = arguments(problem, method, dtype)
    expected = native_launch.launch_cpu(*args)
    first = None
    for grid_threads in (None, 1, 4, 13, 40):
        got = native_launch.launch_cuda_grid_on_cpu(*args, grid_threads=grid_threads)
        assert_rounding_close(method, dtype, got, expected, f"{grid_threads} grid threads")
        if first is None:
            first = got
        else:  # each sample is solved by one thread, whichever: bit for bit the same
            for name, a, b in zip(native_launch.OUTPUTS, got, first, strict=True):
                assert torch.equal(a, b), f"{name} differs with {grid_threads} grid threads"


def test_cuda_grid_on_cpu_reads_strided_inputs_and_reports_errors():
    problem = case(3)
    tensors = problem.tensors(torch.float32)
    views = [x.t().contiguous().t() for x in tensors]
    expected = native_launch.launch_cuda_grid_on_cpu(*arguments(problem, "mf-p", outputs=tensors), grid_threads=4)
    got = native_launch.launch_cuda_grid_on_cpu(*arguments(problem, "mf-p", outputs=views), grid_threads=4)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    views[2][5, 1] = float("nan")
    views[0][9] = -views[0][9]
    errors = native_launch.launch_cuda_grid_on_cpu(*arguments(problem, "mf-p", outputs=views), grid_threads=4)[-1]
    expected_errors = torch.full((problem.num_teachers, len(CHECKS)), -1, dtype=torch.int64)
    expected_errors[2, CHECKS.index("not finite")] = 5
    expected_errors[0, CHECKS.index("negative")] = 9
    assert torch.equal(errors, expected_errors)


TEAM_CASES = {  # beyond CASES: probabilities at a temperature; more classes and teachers than lanes
    "probs at a temperature": dict(seed=3, temperature=0.7, uncovered=2),
    "wide": dict(seed=4, classes=90, teachers=40, coverage=0.2, batch=6, weights=True),
}


def test_the_team_methods_and_their_shapes():
    assert TEAM_METHODS == ["sd", "ce", "mf-lf"]
    shapes = {name: tuple(module.team_shapes[methods.get(name).code]) for name in TEAM_METHODS}
    assert shapes == {"sd": (32, 4), "ce": (128, 1), "mf-lf": (32, 4)}  # a warp a sample; a block of 4 warps


@pytest.mark.parametrize("case_name", [*CASES, *TEAM_CASES])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("method", TEAM_METHODS)
def test_cuda_teams_on_cpu_match_the_cpu_backend_for_any_width(method, dtype, case_name):
    """The GPU's team code (strided lanes, reductions, syncs) with teams of any width, 1 to a warp's
    32 (more lanes than columns, groups or teachers included), and any number of teams: the CPU
    backend's answers to rounding; for one width, bit for bit the same whatever the grid."""
    problem = case(**{**CASES, **TEAM_CASES}[case_name])
    args = arguments(problem, method, dtype)
    expected = native_launch.launch_cpu(*args)
    for lanes in (1, 3, 32):
        first = None
        for teams in (1, 4, 5) if lanes < 32 else (1, 5):  # (32 emulated lanes: a second a launch for ce)
            got = native_launch.launch_cuda_grid_on_cpu(*args, grid_threads=teams, lanes=lanes)
            assert_rounding_close(method, dtype, got, expected, f"{teams} teams of {lanes} lanes")
            if first is None:
                first = got
            else:
                assert torch.equal(got[0], first[0]), f"{teams} teams of {lanes} lanes"


def test_cuda_ce_team_of_a_whole_block_matches_the_cpu_backend():
    """ce's team on the GPU is a block of 128 threads (four warps): its reductions cross warps."""
    args = arguments(case(batch=4, **CASES["probs"]), "ce")
    expected = native_launch.launch_cpu(*args)
    got = native_launch.launch_cuda_grid_on_cpu(*args)  # the GPU's own shape: one block of 128 lanes
    assert_rounding_close("ce", torch.float64, got, expected, "a block of 128 lanes")
    for name in ("residual", "step", "abs_residual"):
        at = native_launch.OUTPUTS.index(name)
        torch.testing.assert_close(got[at], expected[at], rtol=1e-6, atol=1e-12, msg=name)


def test_cuda_ce_team_on_cpu_converges_across_tiny_bridges():
    """Confident consistent teachers joined only through classes of mass 1e-17 and less (see
    test_oracles.test_regression_ce_tiny_bridges_carry_the_split): the team carried D_g from step
    to step and stalled on a fifth of the rows; D_g summed afresh, every row converges to the truth."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.softmax(20 * torch.randn(64, 5, generator=generator, dtype=torch.float64), dim=1)
    sets = [[0, 1, 2], [1, 3], [2, 3, 4]]
    outputs = [truth[:, s] / truth[:, s].sum(dim=1, keepdim=True) for s in sets]
    problem = Case(sets=sets, num_classes=5, truth=truth, outputs=outputs)
    got = native_launch.launch_cuda_grid_on_cpu(*arguments(problem, "ce"), grid_threads=4, lanes=1)
    assert bool(got[native_launch.OUTPUTS.index("converged")].all())
    assert max_diff(got[0], truth) < 1e-7


def test_regression_cuda_ce_team_gradient_as_flows_carries_the_split():
    """Confident consistent teachers (q = softmax(20 g) over 12 classes, 5 teachers): where a block of
    teachers is joined to the rest only through classes of tiny mass, the Newton step along the split
    is the sum of the flows leaving the block (1e-28). The team summed each teacher's gradient from
    its groups' differences, whose rounding (1e-26) swamped it: the step along the split came out ~0
    and rows were reported converged up to 1e-2 off (5 of these 400 rows on one lane, 22 more not
    converged). With the gradient as flows to each group's top teacher (reference/ce.py), every row
    converges to the truth."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.softmax(20 * torch.randn(400, 12, generator=generator, dtype=torch.float64), dim=1)
    sets = [[1, 3, 5, 7, 9], [0, 3, 6, 8, 10, 11], [1, 3, 5, 7, 9], [0, 1, 2, 3, 4, 8], [0, 8, 11]]
    outputs = [truth[:, s] / truth[:, s].sum(dim=1, keepdim=True) for s in sets]
    problem = Case(sets=sets, num_classes=12, truth=truth, outputs=outputs)
    for lanes in (1, 3):
        got = native_launch.launch_cuda_grid_on_cpu(*arguments(problem, "ce"), grid_threads=4, lanes=lanes)
        converged = got[native_launch.OUTPUTS.index("converged")]
        wrong = converged & ((got[0] - truth).abs().amax(dim=1) > 1e-6)
        assert not bool(wrong.any()), f"{lanes} lanes: {int(wrong.sum())} rows reported converged off the optimum"
        assert bool(converged.all()), f"{lanes} lanes: {int((~converged).sum())} rows not converged"
        assert max_diff(got[0], truth) < 1e-8, f"{lanes} lanes"


@pytest.mark.parametrize("method", TEAM_METHODS)
def test_cuda_teams_on_cpu_read_strided_inputs_and_report_errors_as_the_cpu_backend(method):
    problem = case(**CASES["probs"])
    tensors = [x.clone() for x in problem.tensors(torch.float32)]
    views = [x.t().contiguous().t() for x in tensors]
    expected = native_launch.launch_cpu(*arguments(problem, method, outputs=tensors))
    got = native_launch.launch_cuda_grid_on_cpu(*arguments(problem, method, outputs=views), grid_threads=4)
    assert_rounding_close(method, torch.float32, got, expected, "strided views")
    views[2][5, 1] = float("nan")
    views[0][9] = -views[0][9]
    views[1][3] *= 1.5  # a row that does not sum to 1
    views[3][7] = 0.0
    errors = native_launch.launch_cuda_grid_on_cpu(*arguments(problem, method, outputs=views), grid_threads=4)[-1]
    expected_errors = native_launch.launch_cpu(*arguments(problem, method, outputs=views))[-1]
    assert int((expected_errors >= 0).sum()) == 4
    assert torch.equal(errors, expected_errors)


def test_team_plan_puts_scratch_on_chip_when_it_fits():
    per_block = module.team_shapes[methods.get("sd").code][1]
    sizes = native_launch.header(case(4, classes=40, teachers=9).teachers().layout().structure)
    sd, mf_lf = methods.get("sd").code, methods.get("mf-lf").code
    shape = [sizes[k] for k in STRUCTURE_HEADER]
    teams, slots, shared, nbytes = module.team_plan(sd, 10, *shape, 227 << 10, 132 * 64)
    assert (teams, slots, shared, nbytes) == (12, sizes["K"], True, 0)  # whole blocks, 10 samples
    assert module.team_plan(mf_lf, 10, *shape, 227 << 10, 132 * 64)[1] == sizes["K"] + 2 * sizes["N"]
    teams, *_ = module.team_plan(sd, 10**9, *shape, 227 << 10, 132 * 64)
    assert teams == 132 * 64  # no more than the device holds at once
    # scratch that does not fit a block's shared memory goes to a workspace, within the budget
    teams, slots, shared, nbytes = module.team_plan(sd, 10**9, 8, 20000, 30000, 20000, 30000, 0, 227 << 10, 132 * 64)
    assert not shared and nbytes == teams * slots * 8 <= 256 << 20 and teams % per_block == 0
    # ce: a block a sample
    assert module.team_plan(methods.get("ce").code, 10, *shape, 227 << 10, 132 * 16)[0] == 10
    with pytest.raises(ValueError, match=r"does not run by teams"):
        module.team_plan(methods.get("mf-p").code, 10, *shape, 227 << 10, 132 * 64)


def test_grid_plan_caps_workspace_and_threads():
    budget, max_threads = 256 << 20, 1 << 20
    for method in methods.NAMES:
        problem = case(4, classes=40, teachers=9)
        layout = problem.teachers().layout()
        sizes = native_launch.header(layout.structure)
        code = methods.get(method).code
        threads, per_thread = module.grid_plan(code, 1, *(sizes[k] for k in STRUCTURE_HEADER))
        assert threads == 1 and per_thread > 0
        assert module.grid_plan(code, 100, *(sizes[k] for k in STRUCTURE_HEADER)) == (100, 100 * per_thread)
        threads, nbytes = module.grid_plan(code, 10**12, *(sizes[k] for k in STRUCTURE_HEADER))
        assert nbytes == threads * per_thread
        assert threads == max_threads or nbytes <= budget < (threads + 1) * per_thread
        assert nbytes <= budget and threads <= max_threads
    # a tiny problem: the thread cap binds before the workspace does
    tiny = native_launch.header(uhc_fast.TeacherSet([[0, 1]]).layout().structure)
    threads, nbytes = module.grid_plan(methods.get("sd").code, 10**12, *(tiny[k] for k in STRUCTURE_HEADER))
    assert threads == max_threads and nbytes < budget
    # a huge one: one thread still runs
    assert module.grid_plan(methods.get("mf-lu").code, 10, 2000, 4000, 10**6, 4000, 10**6, 10**6)[0] == 1


# ---------------------------------------------------------------------------------------- the launch's arguments
def test_argument_errors_name_the_argument():
    problem = case(5, batch=4)
    args = list(arguments(problem, "mf-lf"))

    def launch(**changes):
        names = ("tensors", "kinds", "structure", "weights", "system", "method", "out_dtype", "temperature", "eps",
                 "tol", "max_iter")  # fmt: skip
        values = dict(zip(names, args))
        isa = changes.pop("isa", "")
        values.update(changes)
        return native_launch.launch_cpu(*values.values(), isa=isa)

    tensors, weights, structure = args[0], args[3], args[2]
    cases = [
        ({"method": "nope"}, r"method='nope': expected one of"),
        ({"weights": weights.float()}, r"weights must be a contiguous \(5,\) float64 tensor"),
        ({"weights": weights[:-1]}, r"weights must be a contiguous \(5,\) float64"),
        ({"system": weights.new_zeros(0, 0)}, r"system must be a contiguous \(5, 5\) float64 tensor .* for mf-lf"),
        ({"structure": structure.long()}, r"structure must be a contiguous 1-D int32 tensor"),
        ({"out_dtype": torch.float16}, r"out_dtype must be float32 or float64"),
        ({"tensors": [tensors[0], tensors[1][:3], *tensors[2:]]}, r"teacher 1: expected a 2-D float tensor of 4 rows"),
        ({"tensors": [tensors[0], tensors[1].int(), *tensors[2:]]}, r"teacher 1: expected a 2-D float tensor"),
        ({"kinds": args[1][:-1]}, r"5 teacher tensors and 4 kinds for N=5"),
        ({"tensors": []}, r"0 teacher tensors and 5 kinds for N=5"),
        ({"max_iter": -1}, r"max_iter must be in \[0, 2\^30\]"),
        ({"isa": "sse9"}, r"instruction set 'sse9'"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            launch(**changes)
    with pytest.raises(ValueError, match=r"teams must be >= 1"):  # mf-lf runs by teams
        native_launch.launch_cuda_grid_on_cpu(*args, grid_threads=0)
    with pytest.raises(ValueError, match=r"lanes must be in \[1, 1024\]"):
        native_launch.launch_cuda_grid_on_cpu(*args, grid_threads=4, lanes=1025)
    with pytest.raises(ValueError, match=r"grid_threads must be >= 1"):
        native_launch.launch_cuda_grid_on_cpu(*arguments(problem, "mf-p"), grid_threads=0)
    with pytest.raises(ValueError, match=r"structure is on cpu, the teachers on meta"):
        launch(tensors=[x.to("meta") for x in tensors])
    # nothing was wrong with the arguments themselves
    assert launch()[0].shape == (4, problem.num_classes)


def test_empty_batch_launches_nothing(monkeypatch):
    problem = case(6)
    args = arguments(problem, "mf-lu", outputs=[x[:0] for x in problem.tensors()])
    calls = []

    class Recorder:
        def __getattr__(self, name):
            return getattr(module, name)

        def solve(self, **kwargs):
            calls.append(kwargs)
            return module.solve(**kwargs)

    monkeypatch.setattr(native_launch, "load_module", lambda kind: Recorder())
    outs = native_launch.launch_cpu(*args)
    assert [tuple(t.shape) for t in outs] == [(0, problem.num_classes), (0,), (0,), (0,), (0,), (0,), (5, 4)]
    assert bool((outs[-1] == -1).all()) and not calls


# ---------------------------------------------------------------------------------------- reading the inputs natively
def test_the_launch_reads_the_callers_memory():
    """The teacher table points at the caller's arrays with their own strides: no copy, no packing."""
    problem = case(7, alpha=0.1)
    base = problem.tensors(torch.float16)
    views = [x.t().contiguous().t() for x in base[:2]] + [
        torch.zeros(13, 2 * x.shape[1], dtype=x.dtype)[:, ::2] for x in base[2:]
    ]
    for view, x in zip(views[2:], base[2:]):
        view.copy_(x)
    kinds = [0] * problem.num_teachers + [0]  # the prior teacher last
    table = native_launch.teacher_table(views, kinds, problem.num_teachers + 1, "cpu")
    assert table.shape == (problem.num_teachers + 1, 4) and table.dtype == torch.int64
    for row, x in zip(table.tolist(), views):
        assert row == [x.data_ptr(), x.stride(0), x.stride(1), native_launch.DTYPE_CODES[torch.float16]]
    assert table[-1, :3].tolist() == [0, 0, 0]  # the prior has no data
    logits = native_launch.teacher_table(views, [1] * len(kinds), len(kinds), "cpu")
    assert (logits[:, 3] >> 32).tolist() == [1] * len(kinds)
    got = native_launch.launch_cpu(*arguments(problem, "ce", outputs=views))
    expected = native_launch.launch_cpu(*arguments(problem, "ce", outputs=[x.contiguous() for x in views]))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_native_validation_reports_each_teachers_first_failing_row_per_check():
    problem = case(8, batch=40)
    outputs = problem.tensors(torch.float32)
    outputs[0][30, 0] = float("inf")
    outputs[0][7, 0] = float("nan")
    outputs[0][3] = -outputs[0][3]  # negative (and summing to -1)
    outputs[0][20] = 0
    outputs[0][25] *= 2
    outputs[3][11] *= 1.01  # sum off
    outputs[3][2] = 0
    errors = native_launch.launch_cpu(*arguments(problem, "sd", outputs=outputs))[-1]
    expected = torch.full((problem.num_teachers, len(CHECKS)), -1, dtype=torch.int64)
    expected[0] = torch.tensor([7, 3, 20, 25])
    expected[3, CHECKS.index("sum off")] = 11
    expected[3, CHECKS.index("all zero")] = 2
    assert torch.equal(errors, expected)
    with pytest.raises(uhc_fast.InputError, match=r"teacher 0, row 7: outputs contain NaN or Inf"):
        uhc_fast.estimate(outputs, problem.sets, "sd", backend="cpu")
    # logits are checked for NaN/Inf only
    problem = case(8, batch=40, inputs="logits")
    logits = problem.tensors(torch.float32)
    logits[1][4, 0] = float("-inf")
    logits[1][9] = -1e4
    errors = native_launch.launch_cpu(*arguments(problem, "mf-lf", outputs=logits))[-1]
    assert errors[1].tolist() == [4, -1, -1, -1] and bool((errors[[0, 2, 3, 4]] == -1).all())


# ---------------------------------------------------------------------------------------- threads and info
def test_openmp_threads_follow_torch(monkeypatch):
    seen = []

    class Recorder:
        def __getattr__(self, name):
            return getattr(module, name)

        def solve(self, **kwargs):
            seen.append(kwargs["threads"])
            return module.solve(**kwargs)

    monkeypatch.setattr(native_launch, "load_module", lambda kind: Recorder())
    problem = case(9, batch=64)
    saved = torch.get_num_threads()
    answers = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            answers[threads] = uhc_fast.estimate(problem.tensors(), problem.sets, "ce", backend="cpu")
    finally:
        torch.set_num_threads(saved)
    assert seen == [1, 2, 3]
    assert torch.equal(answers[1], answers[2]) and torch.equal(answers[1], answers[3])
    assert module.max_threads() >= 1 and isinstance(module.openmp, bool)


def test_info_reports_built_available_isa_and_lanes():
    report = uhc_fast.info()
    cpu = report["cpu"]
    assert cpu["available"] is True and cpu["built"] is True
    assert cpu["isa"] == module.default_isa() and cpu["lanes"] == module.isas()[cpu["isa"]]["lanes"]
    assert cpu["isas_built"] == sorted(module.isas())
    assert cpu["openmp"] == module.openmp and cpu["threads"] >= 1
    assert set(cpu["methods"]) == set(methods.NAMES) and cpu["devices"] == ["cpu"]
    assert report["auto"]["cpu"] == "cpu"
    cuda = report["cuda"]
    assert cuda["built"] == native_launch.built("cuda")
    if not torch.cuda.is_available():
        assert cuda["available"] is False
        assert (
            ("is built" in cuda["reason"] and "not usable" in cuda["reason"])
            if cuda["built"]
            else ("not built" in cuda["reason"])
        )
    else:
        assert cuda["available"] is cuda["built"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("method", methods.NAMES)
def test_cuda_launch_matches_its_grid_on_the_cpu(method, dtype):
    """On a GPU: the device launch computes what its grid computes on the CPU (the same one-lane code)."""
    if not native_launch.built("cuda"):
        pytest.skip("the CUDA extension is not built")
    problem = case(**{**CASES["probs"], "batch": 10})
    args = arguments(problem, method, dtype)
    expected = native_launch.launch_cuda_grid_on_cpu(*args)
    cuda_args = ([x.cuda() for x in args[0]], args[1], *(t.cuda() for t in args[2:5]), *args[5:])
    got = [t.cpu() for t in native_launch.launch_cuda(*cuda_args)]
    assert_rounding_close(method, dtype, got, expected, "CUDA vs its grid on the CPU")
