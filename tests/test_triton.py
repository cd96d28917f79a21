"""What is particular to the Triton kernels, against the torch reference.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported and these run on
CPU tensors through the interpreter (about 400x slower than torch, hence the tiny shapes); with a GPU
they run compiled on CUDA tensors. The backend-independent checks (every method against the
reference and the oracles) live in test_backends.py and test_oracles.py; this module covers the
kernels' own machinery: the sparse plan tables, SELL chunks that split the rows raggedly, the
persistent grid, reading each teacher's array in its stored dtype and strides with validation in
the kernel, the algorithms step for step in float64, one-class teachers, zero probabilities and
uncovered classes, the alpha prior, the teacher limits, the fused loss (values and gradients,
gradcheck, custom-op checks), the production tile shapes once, and the launch device.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import uhc_fast  # noqa: E402
from uhc_fast import constants, reference  # noqa: E402
from uhc_fast.backends import triton as triton_backend  # noqa: E402
from uhc_fast.errors import InputError  # noqa: E402
from uhc_fast.inputs import convert, pack  # noqa: E402
from uhc_fast.methods import ITERATIVE, METHODS  # noqa: E402
from uhc_fast.options import Options  # noqa: E402

from .problems import consistent_outputs, noisy, random_class_sets, random_soft_labels, tolerance  # noqa: E402

kernels = triton_backend.kernels()
from uhc_fast.kernels import _common, launch, plan  # noqa: E402
from uhc_fast.kernels import topk as topk_kernels  # noqa: E402

DEVICE = "cpu" if kernels.interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("neither a GPU nor TRITON_INTERPRET=1", allow_module_level=True)
interpret = pytest.mark.interpret
ALL = tuple(METHODS)


# ---------------------------------------------------------------------------------------- helpers
def make_batch(method, sets, outputs, *, num_classes=None, weights=None, alpha=None, inputs="probs", **options):
    """A :class:`uhc_fast.inputs.Batch` for ``method`` on ``outputs`` (as they are: not copied)."""
    opts = Options(method=method, inputs=inputs, weights=weights, alpha=alpha, **options)
    return convert(outputs, uhc_fast.TeacherSet(sets, num_classes=num_classes), opts)


def run_kernel(method, batch, block_rows=4, programs=None, max_iter=None):
    """The kernel's outputs (launch.OUTPUTS) with a plan of SELL chunks of ``block_rows`` rows."""
    layout = batch.solved_teachers.layout(batch.device)
    anchor = torch.where(layout.prior_mask, 2, layout.scale_anchor.long())
    tables = plan.plan_for(layout.offsets, layout.class_index, layout.num_classes, anchor, block_rows)
    out_dtype = constants.compute_dtype(batch.compute_dtype)
    weights = batch.solved_weights(torch.float64, batch.device)
    system = layout.mf_lf_system(weights, torch.float64) if METHODS[method].needs_system else None
    settings = triton_backend.settings(batch, out_dtype)
    if max_iter is not None:
        settings = launch.Settings(**{**settings.__dict__, "max_iter": max_iter})
    return kernels.solve(
        method, batch.tensors, list(batch.kinds), tables, weights, system, out_dtype, settings, programs=programs
    )


def run_reference(method, batch, max_iter=None):
    problem = pack(batch, METHODS[method].value_kind, torch.float64)
    options = batch.options
    cap = options.iteration_cap() if max_iter is None else max_iter
    return reference.SOLVERS[method](problem, options.tol_for(problem.dtype), cap)


def noisy_problem(batch, classes, teachers, seed, dtype=torch.float64, coverage=0.35, kind="probs"):
    sets = random_class_sets(classes, teachers, coverage, np.random.default_rng(seed))
    q = random_soft_labels(batch, classes, seed)
    outputs = noisy(consistent_outputs(q, sets, kind), 0.4, seed, kind=kind)
    return sets, [x.to(dtype=dtype, device=DEVICE) for x in outputs]


def assert_agree(method, got, ref, step_for_step):
    """Soft labels to the reference's; in float64 the iterative kernels take the reference's very steps."""
    soft = got[0]
    dtype = soft.dtype
    assert soft.dtype == ref.soft.dtype and bool(torch.isfinite(soft).all())
    torch.testing.assert_close(soft.sum(dim=1), torch.ones_like(soft[:, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(soft.cpu(), ref.soft.cpu(), atol=tolerance(method, dtype), rtol=0)
    if method in ITERATIVE:
        iterations, converged, residual = got[1].cpu(), got[2].cpu(), got[3].cpu()
        if step_for_step:
            assert torch.equal(iterations, ref.iterations.cpu())
            assert torch.equal(converged, ref.converged.cpu())
            # a relative residual under ~1e-12 (a few thousand ulps of its float64 sums) is rounding:
            # there the two agree only as far as their summation orders (and the machine's BLAS) do
            torch.testing.assert_close(residual, ref.residual.cpu(), atol=1e-12, rtol=1e-5)
        else:
            assert int((iterations - ref.iterations.cpu()).abs().max()) <= 2


# ---------------------------------------------------------------------------------------- the plan
@interpret
def test_plan_tables_describe_the_layout():
    """Every SELL table lists what the layout says: each class's covering teachers and columns, each
    group's teachers, each teacher pair's shared groups and classes; chunks are -1 padded."""
    sets = [[0, 1, 2, 3], [2, 3, 4], [4, 5, 0], [6], [1, 6]]
    layout = uhc_fast.TeacherSet(sets, num_classes=8).layout()  # class 7: covered by nobody
    built = plan.build(layout.offsets, layout.class_index, layout.num_classes, None, block_rows=2)
    buf = built.tables.tolist()
    scalars = dict(zip(plan.SCALARS, buf))
    head = len(plan.SCALARS)
    section = {name: buf[head + i] for i, name in enumerate(plan.SECTIONS)}

    def sell(prefix, fields, rows):
        width = buf[section[f"{prefix}_width"] : section[f"{prefix}_width"] + scalars[f"{prefix}_chunks"]]
        base = buf[section[f"{prefix}_base"] : section[f"{prefix}_base"] + scalars[f"{prefix}_chunks"]]
        out = []
        for r in range(rows):
            c, lane = divmod(r, 2)
            cells = [tuple(buf[section[f] + base[c] + j * 2 + lane] for f in fields) for j in range(width[c])]
            out.append([cell for cell in cells if cell[0] >= 0])
        return out

    assert scalars["N"] == 5 and scalars["K"] == 8 and scalars["nnz"] == 13 and scalars["block_rows"] == 2
    classes = sell("c", ("c_tch", "c_col"), 8)
    for c in range(8):
        expected = [(i, layout.offsets[i].item() + sets[i].index(c)) for i in range(5) if c in sets[i]]
        assert classes[c] == expected
    groups = sell("g", ("g_tch",), scalars["G"])
    members = {tuple(t for (t,) in row) for row in groups}
    assert members == {tuple(i for i in range(5) if c in sets[i]) for c in range(8)}
    assert [len(row) for row in groups] == sorted((len(row) for row in groups), reverse=True)  # by falling degree
    pairs = sell("pc", ("pc_cls",), scalars["pairs_c"])
    i_of = buf[section["pc_i"] : section["pc_i"] + scalars["pairs_c"]]
    j_of = buf[section["pc_j"] : section["pc_j"] + scalars["pairs_c"]]
    for r, row in enumerate(pairs):
        assert [c for (c,) in row] == sorted(set(sets[i_of[r]]) & set(sets[j_of[r]]))
    assert built.counts["pair_class_entries"] == sum(
        len(set(a) & set(b)) for k, a in enumerate(sets) for b in sets[k + 1 :]
    )


# ---------------------------------------------------------------------------------------- the algorithms
@interpret
@pytest.mark.parametrize("method", ALL)
def test_float64_step_for_step_with_ragged_chunks(method):
    """K = 11 and N = 4 in SELL chunks of 4 rows (the last one ragged): the kernels take the
    reference's very steps (same iterations, convergence and residuals)."""
    kind = METHODS[method].value_kind
    sets, outputs = noisy_problem(2, 11, 4, seed=1, kind=kind)
    batch = make_batch(method, sets, outputs, weights=[0.5, 1.0, 1.5, 0.8], inputs=kind)
    assert_agree(method, run_kernel(method, batch), run_reference(method, batch), step_for_step=True)


@interpret
@pytest.mark.parametrize("method", ["sd", "ce", "mf-lf"])
def test_float32_answers(method):
    kind = METHODS[method].value_kind
    sets, outputs = noisy_problem(3, 11, 4, seed=2, dtype=torch.float32, kind=kind)
    batch = make_batch(method, sets, outputs, inputs=kind)
    got = run_kernel(method, batch, block_rows=8)
    assert got[0].dtype == torch.float32
    assert_agree(method, got, run_reference(method, batch), step_for_step=False)


@interpret
@pytest.mark.parametrize("method", ALL)
def test_one_class_teachers_zero_probabilities_uncovered_classes(method):
    """K = 14 (class 13 declared, covered by nobody), two one-class teachers, zero probabilities."""
    sets = [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12, 0], [3], [10]]
    q = random_soft_labels(2, 13, seed=5)
    outputs = noisy(consistent_outputs(q, sets), 0.3, seed=5)
    outputs[0][:, [1, 4]] = 0
    outputs[0] /= outputs[0].sum(dim=1, keepdim=True)
    kind = METHODS[method].value_kind
    batch = make_batch(method, sets, [x.to(DEVICE) for x in outputs], num_classes=14)
    cap = 12  # (mf-p needs ~100 steps on one of these rows: the same cap for both solvers)
    got, ref = run_kernel(method, batch, block_rows=4, max_iter=cap), run_reference(method, batch, max_iter=cap)
    assert_agree(method, got, ref, step_for_step=method in ("ce", "sd"))
    assert bool((got[0][:, 13] == 0).all())
    if kind == "probs" and method != "mf-p":
        assert bool((got[0][:, 1] == 0).all())  # no teacher gives class 1 any mass


@interpret
@pytest.mark.parametrize("method", ["sd", "ce", "mf-lf", "mf-lu"])
def test_alpha_prior_on_a_disconnected_graph(method):
    sets = [[0, 1, 2], [2, 3], [4, 5], [5, 6]]
    kind = METHODS[method].value_kind
    q = random_soft_labels(2, 7, seed=7)
    outputs = [x.to(DEVICE) for x in noisy(consistent_outputs(q, sets, kind), 0.2, seed=7, kind=kind)]
    batch = make_batch(method, sets, outputs, alpha=0.05, inputs=kind)
    assert batch.solved_teachers.num_teachers == 5
    assert_agree(method, run_kernel(method, batch), run_reference(method, batch), step_for_step=True)


@interpret
def test_ce_flows_carry_a_split_across_tiny_classes():
    """Two rows of confident teachers (q = softmax(20 g) over 12 classes, random sets: the spec's
    family) whose blocks of teachers are joined only through classes of mass 1e-14 and less. The
    gradient summed per teacher drowned the flows leaving a block in the rounding of its internal
    ones: both rows were reported converged 3e-2 off. As flows to each group's top teacher, solved
    in flow form, they converge to the truth (consistent teachers: the optimum is q itself)."""
    truth = torch.tensor(
        [
            [7.391548040370919e-05, 5.031225380981252e-31, 2.026425793201315e-17, 1.151791270660619e-28,
             1.6118682417035072e-14, 4.2206166711307855e-17, 1.4666913703340466e-26, 0.0776831678110265,
             0.9222429158799174, 3.0515868813222046e-19, 8.286351802556903e-10, 1.2371840263448189e-15],
            [1.693200244218528e-28, 1.94489370849194e-25, 0.661543588233043, 3.3054208754607057e-16,
             7.587140447201167e-26, 2.255934084679657e-23, 6.200737253086842e-08, 9.530132214160024e-24,
             5.9456829275234676e-21, 3.2135311557224795e-25, 1.8589709060021653e-26, 0.3384563497595841],
        ],
        dtype=torch.float64,
    )  # fmt: skip
    sets = [[1, 3, 5, 7, 9], [0, 3, 6, 8, 10, 11], [1, 3, 5, 7, 9], [0, 1, 2, 3, 4, 8], [0, 8, 11]]
    outputs = [(truth[:, s] / truth[:, s].sum(dim=1, keepdim=True)).to(DEVICE) for s in sets]
    soft, _iterations, converged, *_ = run_kernel("ce", make_batch("ce", sets, outputs))
    assert bool(converged.all())
    torch.testing.assert_close(soft.cpu(), truth, atol=1e-8, rtol=0)


@interpret
def test_ce_float32_newton_system_keeps_links_below_float32_range():
    """Six float32 rows of confident teachers (q = softmax(20 g) over random sets of 12 classes,
    weights spanning e^-2..e^2) whose blocks of teachers are joined only through classes of mass
    1e-39 and less: the Newton system in float32 (the answers' dtype) lost those links, and the
    compiled CPU and torch backends reported these rows converged 0.03 to 1.0 off. In float64
    they converge to the truth, to float32's precision."""
    sets = [[4, 7, 9], [3, 4, 5, 6], [0, 4], [1, 3, 7, 8, 11], [4, 5, 6, 8, 9, 11], [0, 3, 4, 10, 11], [0, 2]]
    weights = torch.exp(torch.from_numpy(np.random.default_rng(1).uniform(-2, 2, len(sets)))).tolist()
    truth = torch.softmax(20 * torch.from_numpy(np.random.default_rng(1).standard_normal((400, 12))), dim=1)
    truth = truth[[74, 116, 281, 287, 292, 333]]
    outputs = [(truth[:, s] / truth[:, s].sum(dim=1, keepdim=True)).float().to(DEVICE) for s in sets]
    soft, _iterations, converged, *_ = run_kernel("ce", make_batch("ce", sets, outputs, weights=weights))
    assert bool(converged.all())
    torch.testing.assert_close(soft.cpu().double(), truth, atol=1e-5, rtol=0)


@interpret
def test_max_iter_caps_the_steps_and_converged_means_both_tests_pass():
    sets, outputs = noisy_problem(3, 9, 4, seed=8)
    batch = make_batch("ce", sets, outputs)
    capped = run_kernel("ce", batch, max_iter=1)
    reference_capped = run_reference("ce", batch, max_iter=1)
    assert int(capped[1].max()) <= 1 and not bool(capped[2].any())
    torch.testing.assert_close(capped[0], reference_capped.soft, atol=1e-12, rtol=0)
    _soft, _iterations, converged, residual, step, abs_residual, errors = run_kernel("ce", batch)
    tol = batch.options.tol_for(torch.float64)
    assert bool(converged.all()) and bool((residual <= tol).all()) and bool((step <= tol).all())
    assert bool((abs_residual <= residual * 1.0 + 1e-300).all())  # |n gap| <= max n * max gap <= sum w gap
    assert bool((errors == -1).all())


@interpret
@pytest.mark.parametrize("method", ["sd", "ce", "mf-lu"])
def test_the_persistent_grid_changes_no_row(method):
    """Samples are independent of the program that solves them: 1, 2 or 3 programs, same bits."""
    kind = METHODS[method].value_kind
    sets, outputs = noisy_problem(5, 8, 3, seed=4, kind=kind)
    batch = make_batch(method, sets, outputs, inputs=kind)
    one = run_kernel(method, batch, programs=1)
    for programs in (2, 3):
        other = run_kernel(method, batch, programs=programs)
        for a, b in zip(one, other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------- reading the inputs
@interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_inputs_are_read_in_their_stored_dtype(dtype):
    """Each dtype read as it is (no copy): the answer is the reference's on the same values."""
    sets, outputs = noisy_problem(2, 9, 3, seed=3, dtype=dtype)
    for method in ("sd", "ce"):
        batch = make_batch(method, sets, outputs)
        got = run_kernel(method, batch)
        assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_agree(method, got, run_reference(method, batch), step_for_step=dtype == torch.float64)


@interpret
def test_mixed_dtypes_strides_and_numpy_inputs():
    """A float16 teacher next to float32 ones, a non-contiguous teacher (a column slice of a wider
    array, and a transposed one), numpy arrays: read in place, same answers as the reference."""
    sets, outputs = noisy_problem(3, 10, 3, seed=9, dtype=torch.float32)
    wide = torch.zeros(3, outputs[0].shape[1] + 5, dtype=torch.float32, device=DEVICE)
    wide[:, 2 : 2 + outputs[0].shape[1]] = outputs[0]
    transposed = outputs[1].t().contiguous().t()
    mixed = [wide[:, 2 : 2 + outputs[0].shape[1]], transposed, outputs[2].half()]
    assert not mixed[0].is_contiguous() and mixed[1].stride(0) == 1
    for method in ("sd", "ce", "mf-lf"):
        kind = METHODS[method].value_kind
        batch = make_batch(method, sets, mixed)
        assert_agree(method, run_kernel(method, batch), run_reference(method, batch), step_for_step=False)
        del kind
    if DEVICE == "cpu":
        arrays = [x.numpy() for x in outputs]
        soft = uhc_fast.estimate(arrays, sets, "sd", backend="triton")
        assert isinstance(soft, np.ndarray)
        np.testing.assert_allclose(soft, uhc_fast.estimate(arrays, sets, "sd", backend="torch"), atol=1e-6)


@interpret
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda x: x.__setitem__((1, 0), float("nan")), "NaN or Inf"),
        (lambda x: x.__setitem__((2, 1), -0.25), "negative"),
        (lambda x: x.__setitem__((1, slice(None)), 0.0), "all probabilities are zero"),
        (lambda x: x.__setitem__((2, 0), x[2, 0] + 0.5), "sum to"),
    ],
    ids=["nan", "negative", "zero", "sum"],
)
def test_validation_in_the_kernel_names_teacher_and_row(damage, message):
    """The kernel's checks raise what ``check_values`` raises: the teacher and its first bad row."""
    sets, outputs = noisy_problem(4, 8, 3, seed=12, dtype=torch.float32)
    damage(outputs[1])
    damage(outputs[2])  # the same damage on a later teacher: teacher 1 is reported
    with pytest.raises(InputError, match=message) as caught:
        uhc_fast.estimate(outputs, sets, "ce", backend="triton")
    assert caught.value.teacher == 1
    assert caught.value.row in (1, 2)


@interpret
def test_logits_temperature_and_eps_on_the_way_in():
    sets, outputs = noisy_problem(2, 9, 3, seed=13, dtype=torch.float64)
    outputs[0][0, 0] = 0.0  # log(max(0, eps)) for the logit methods
    outputs[0][0] /= outputs[0][0].sum()
    for method, extra in (("mf-lf", {"eps": 1e-6}), ("ce", {"temperature": 2.5}), ("sd", {"temperature": 0.5})):
        batch = make_batch(method, sets, outputs, **extra)
        assert_agree(method, run_kernel(method, batch), run_reference(method, batch), step_for_step=True)
    logit_outputs = [torch.log(x) for x in outputs[1:]]
    batch = make_batch("ce", sets[1:], logit_outputs, num_classes=9, inputs="logits", temperature=2.0)
    assert_agree("ce", run_kernel("ce", batch), run_reference("ce", batch), step_for_step=True)


# ---------------------------------------------------------------------------------------- the backend
@interpret
def test_backend_solution_carries_the_methods_own_diagnostics():
    sets, outputs = noisy_problem(2, 8, 3, seed=14)
    _, info = uhc_fast.estimate(outputs, sets, "ce", backend="triton", return_info=True)
    assert info["backend"] == "triton"
    for key in ("iterations", "residual", "converged", "step", "abs_residual"):
        assert info[key].shape == (2,), key
    assert info["converged"].dtype == torch.bool
    _, info = uhc_fast.estimate(outputs, sets, "sd", backend="triton", return_info=True)
    assert "converged" not in info


@interpret
def test_beyond_a_kernels_teacher_limit_the_reference_runs_and_says_so(monkeypatch):
    monkeypatch.setitem(launch.MAX_TEACHERS, "ce", 2)
    sets, outputs = noisy_problem(2, 6, 3, seed=10)
    soft, info = uhc_fast.estimate(outputs, sets, "ce", backend="triton", return_info=True)
    assert info["backend"] == "torch"
    assert "at most 2 teachers" in info["fallback"]
    expected = uhc_fast.estimate(outputs, sets, "ce", backend="torch")
    assert torch.equal(soft, expected)


@interpret
def test_empty_batch():
    sets, outputs = noisy_problem(2, 6, 3, seed=9)
    empty = [x[:0] for x in outputs]
    for method in ALL:
        kind = METHODS[method].value_kind
        assert uhc_fast.estimate(empty, sets, method, inputs="probs", backend="triton").shape == (0, 6), kind


@interpret
def test_settings_defaults_are_the_libraries_constants():
    defaults = launch.Settings()
    assert defaults.armijo == constants.ARMIJO and defaults.max_halvings == constants.MAX_HALVINGS
    assert defaults.max_log_step == constants.MAX_LOG_STEP and defaults.min_scale == constants.MIN_SCALE
    assert defaults.converged_log_step == constants.CONVERGED_LOG_STEP
    assert defaults.change_rounding == constants.CHANGE_ROUNDING
    assert topk_kernels.CONVERGED_LOG_STEP == constants.CONVERGED_LOG_STEP
    assert (topk_kernels.ARMIJO, topk_kernels.MAX_HALVINGS) == (constants.ARMIJO, constants.MAX_HALVINGS)
    assert topk_kernels.MAX_LOG_STEP == constants.MAX_LOG_STEP
    assert defaults.max_iter == constants.DEFAULT_MAX_ITER == defaults.ce_max_iter


@interpret
def test_launch_device_guard():
    """Launches make the tensors' CUDA device current (Triton launches on the current device)."""
    guard = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_common.device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.gpu
def test_launch_on_a_device_other_than_the_current_one():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    sets, outputs = noisy_problem(64, 12, 4, seed=15, dtype=torch.float32)
    outputs = [x.to(device) for x in outputs]
    with torch.cuda.device(0):
        soft = uhc_fast.estimate(outputs, sets, "ce", backend="triton")
    assert soft.device == device
    expected = uhc_fast.estimate([x.cpu() for x in outputs], sets, "ce", backend="torch")
    torch.testing.assert_close(soft.cpu(), expected, atol=2e-4, rtol=0)


@interpret
def test_the_production_tile_shapes_once():
    """K = 1000, N = 20 teachers covering ~25% each (BLOCK_N = 32 and the production SELL chunks),
    two samples of float16 probabilities: ce and sd agree with the reference."""
    sets, outputs = noisy_problem(2, 1000, 20, seed=16, dtype=torch.float16, coverage=0.25)
    for method in ("sd", "ce"):
        batch = make_batch(method, sets, outputs)
        got = run_kernel(method, batch, block_rows=launch.BLOCK_ROWS)
        assert_agree(method, got, run_reference(method, batch), step_for_step=False)


# ---------------------------------------------------------------------------------------- the loss
def loss_problem(batch=5, classes=21, teachers=5, seed=11, dtype=torch.float32):
    sets, outputs = noisy_problem(batch, classes, teachers, seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, classes, generator=gen, dtype=dtype)).to(DEVICE)
    problem = pack(make_batch("ce", sets, outputs), "probs")
    return problem, logits


@interpret
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_loss_and_gradient_match_the_reference(logit_dtype, monkeypatch):
    monkeypatch.setattr(launch, "BLOCK_ROWS", 8)  # several class chunks in the backward
    problem, logits = loss_problem()
    logits = logits.to(logit_dtype).requires_grad_()
    upcast = logits.detach().float().requires_grad_()
    got = triton_backend.direct_ce_loss(logits, problem)
    expected = reference.direct_ce_loss(upcast, problem)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    weights = torch.linspace(0.5, 2.0, logits.shape[0], device=DEVICE)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    assert logits.grad.dtype == logit_dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[logit_dtype]
    torch.testing.assert_close(logits.grad.float(), upcast.grad, atol=tol, rtol=tol)


@interpret
def test_loss_gradcheck_float64():
    problem, logits = loss_problem(batch=3, classes=8, teachers=3, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda u: triton_backend.direct_ce_loss(u, problem), (logits,))


@interpret
def test_uhc_loss_module_with_the_fused_loss():
    sets, outputs = noisy_problem(4, 10, 4, seed=12, dtype=torch.float32)
    logits = torch.randn(4, 10, device=DEVICE)
    fused = uhc_fast.UHCLoss(sets, weights=[1, 2, 1, 0.5], temperature=2.0, backend="triton")
    plain = uhc_fast.UHCLoss(sets, weights=[1, 2, 1, 0.5], temperature=2.0, backend="torch")
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fused(a, outputs).backward()
    plain(b, outputs).backward()
    torch.testing.assert_close(fused(a, outputs), plain(b, outputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


@interpret
def test_custom_ops_pass_opcheck():
    problem, logits = loss_problem(batch=3, classes=7, teachers=3)
    tables = triton_backend.plan(problem.layout)
    torch.library.opcheck(
        kernels.ops.triton_loss,
        (logits.requires_grad_(), problem.values, problem.weights, tables.tables, tables.block_rows),
    )
    sets, outputs = noisy_problem(3, 7, 3, seed=13, dtype=torch.float32)
    batch = make_batch("ce", sets, outputs)
    layout = batch.solved_teachers.layout(DEVICE)
    torch.library.opcheck(
        kernels.ops.solve,
        (
            outputs,
            [0, 0, 0],
            triton_backend.plan(layout).tables,
            batch.solved_weights(torch.float64, DEVICE),
            None,
            "ce",
            7,
            False,
            1.0,
            1e-12,
            1e-5,
            100,
            [1e-4] * 3,
        ),
    )


@interpret
def test_torch_compile_over_estimate_and_the_loss():
    sets, outputs = noisy_problem(3, 9, 3, seed=14, dtype=torch.float32)
    uhc_fast.info()  # load the backends outside the compiled region
    teachers = uhc_fast.TeacherSet(sets)
    teachers.layout(DEVICE)
    triton_backend.plan(teachers.layout(DEVICE))
    compiled = torch.compile(
        lambda *xs: uhc_fast.estimate(list(xs), teachers, "ce", backend="triton"), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(
        compiled(*outputs), uhc_fast.estimate(outputs, sets, "ce", backend="torch"), atol=2e-4, rtol=0
    )
    loss_fn = uhc_fast.UHCLoss(sets, backend="triton")
    model = torch.nn.Linear(6, 9).to(DEVICE)
    x = torch.randn(3, 6, device=DEVICE)
    loss_fn(model(x).detach(), outputs)  # an eager call builds the layout and the kernels' tables
    step = torch.compile(lambda x, outs: loss_fn(model(x), outs), fullgraph=True, backend="aot_eager")
    loss = step(x, outputs)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = uhc_fast.UHCLoss(sets, backend="torch")(model(x), outputs)
    eager.backward()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- the backend's report
@interpret
def test_backend_reports_itself():
    report = uhc_fast.info()["triton"]
    assert report["available"], report
    assert report["devices"] == [DEVICE]
    assert report["methods"] == sorted(METHODS)
    assert "torch reference beyond" in report["fallback"]


@interpret
def test_backend_refuses_cpu_tensors_without_the_interpreter():
    code = (
        "import torch\n"
        "from uhc_fast import backends\n"
        "b = backends.load('triton')\n"
        "print('unavailable' if isinstance(b, str) else b.device_types)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    expected = "('cuda',)" if torch.cuda.is_available() else "unavailable"
    assert out.stdout.strip() == expected
