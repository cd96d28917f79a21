"""UHCLoss, distillation_loss and class_balance_weights."""

import numpy as np
import pytest
import torch

import uhc_fast
from uhc_fast import UHCLoss, backends, class_balance_weights, distillation_loss
from uhc_fast.reference import direct_ce_loss

from .problems import consistent_outputs, make, random_soft_labels


def setup(batch=6, num_classes=9, num_teachers=4, seed=0):
    problem = make(seed, batch=batch, classes=num_classes, teachers=num_teachers, noise=0.4)
    return problem.sets, problem.outputs


def test_gradcheck_float64():
    sets, outputs = setup()
    loss_fn = UHCLoss(sets, weights=[1.0, 2.0, 0.5, 1.5], reduction="sum", backend="torch")
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: loss_fn(u, outputs), (logits,))
    assert torch.autograd.gradgradcheck(lambda u: loss_fn(u, outputs), (logits,))


def test_gradient_has_the_closed_form():
    sets, outputs = setup()
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    UHCLoss(sets, reduction="sum")(logits, outputs).backward()
    expected = torch.zeros(6, 9, dtype=torch.float64)
    for cs, p in zip(sets, outputs):
        expected[:, cs] += torch.softmax(logits.detach()[:, cs], dim=1) - p
    torch.testing.assert_close(logits.grad, expected)


def test_minimiser_over_free_logits_is_the_ce_estimate():
    sets, outputs = setup(batch=4)
    loss_fn = UHCLoss(sets, reduction="sum")
    logits = torch.zeros(4, 9, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [logits], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        optimiser.zero_grad()
        loss = loss_fn(logits, outputs)
        loss.backward()
        return loss

    optimiser.step(closure)
    torch.testing.assert_close(
        torch.softmax(logits.detach(), dim=1), uhc_fast.estimate(outputs, sets, "ce"), atol=1e-6, rtol=0
    )


def test_reductions_temperature_and_logit_inputs():
    sets, outputs = setup()
    logits = torch.randn(6, 9, dtype=torch.float64)
    per_sample = UHCLoss(sets, reduction="none")(logits, outputs)
    assert per_sample.shape == (6,)
    torch.testing.assert_close(UHCLoss(sets)(logits, outputs), per_sample.mean())
    torch.testing.assert_close(UHCLoss(sets, reduction="sum")(logits, outputs), per_sample.sum())
    # logits in, probabilities out: the same loss
    teacher_logits = [torch.log(p) + 3.0 for p in outputs]
    torch.testing.assert_close(UHCLoss(sets, inputs="logits", reduction="none")(logits, teacher_logits), per_sample)
    # temperature: both sides divided by T, times T^2
    t = 2.0
    hot = [torch.softmax(torch.log(p) / t, dim=1) for p in outputs]
    torch.testing.assert_close(
        UHCLoss(sets, temperature=t, reduction="none")(logits, outputs),
        UHCLoss(sets, reduction="none")(logits / t, hot) * t * t,
    )


def test_loss_errors():
    sets, outputs = setup()
    loss_fn = UHCLoss(sets)
    with pytest.raises(ValueError, match=r"student_logits must be \(B, 9\)"):
        loss_fn(torch.zeros(6, 8), outputs)
    with pytest.raises(ValueError, match=r"student_logits has 5 rows but the teachers' outputs have 6"):
        loss_fn(torch.zeros(5, 9), outputs)
    with pytest.raises(ValueError, match=r"reduction='avg'"):
        UHCLoss(sets, reduction="avg")
    with pytest.raises(uhc_fast.InputError, match=r"backend='gpu': expected one of"):
        UHCLoss(sets, backend="gpu")
    with pytest.raises(uhc_fast.InputError, match=r"teacher 1, row 2: outputs contain NaN or Inf"):
        bad = [x.clone() for x in outputs]
        bad[1][2, 0] = float("nan")
        loss_fn(torch.zeros(6, 9), bad)


def test_distillation_loss_is_cross_entropy_with_class_weights():
    soft = random_soft_labels(5, 4, 0)
    logits = torch.randn(5, 4, dtype=torch.float64)
    plain = distillation_loss(logits, soft, reduction="none")
    torch.testing.assert_close(plain, -(soft * torch.log_softmax(logits, dim=1)).sum(dim=1))
    weights = torch.tensor([1.0, 2.0, 0.5, 0.5], dtype=torch.float64)
    weighted = distillation_loss(logits, soft, class_weights=weights)
    torch.testing.assert_close(weighted, -(soft * weights * torch.log_softmax(logits, dim=1)).sum(dim=1).mean())
    hot = distillation_loss(logits, soft, temperature=3.0, reduction="sum")
    torch.testing.assert_close(hot, -9 * (soft * torch.log_softmax(logits / 3, dim=1)).sum())
    with pytest.raises(ValueError, match=r"soft_labels shape"):
        distillation_loss(logits, soft[:, :3])


def test_class_balance_weights():
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])
    weights = class_balance_weights(soft)
    # means 0.7 and 0.3: weights proportional to 1/0.7 and 1/0.3, averaging 1 over present classes
    torch.testing.assert_close(weights, torch.tensor([0.6, 1.4, 0.0]))
    assert isinstance(class_balance_weights(soft.numpy()), np.ndarray)
    with pytest.raises(ValueError, match=r"soft_labels must be \(B, K\)"):
        class_balance_weights(torch.zeros(0, 3))


def test_the_cpu_backend_trains_with_the_reference_loss_and_says_so():
    sets, outputs = setup()
    cpu = backends.select("cpu", torch.device("cpu")) if uhc_fast.info()["cpu"]["available"] else None
    if cpu is None:
        pytest.skip("the cpu backend is not available")
    assert cpu.loss is direct_ce_loss and uhc_fast.info()["cpu"]["loss"] == "the torch reference"
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    on_cpu = UHCLoss(sets, backend="cpu", reduction="none")(logits, outputs)
    on_torch = UHCLoss(sets, backend="torch", reduction="none")(logits, outputs)
    assert torch.equal(on_cpu, on_torch)
    (grad_cpu,) = torch.autograd.grad(on_cpu.sum(), logits)
    (grad_torch,) = torch.autograd.grad(on_torch.sum(), logits)
    assert torch.equal(grad_cpu, grad_torch)


def test_float64_student_with_float32_teachers():
    sets, outputs = setup()
    narrow = [p.float() for p in outputs]
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    loss = UHCLoss(sets, reduction="none")(logits, narrow)
    assert loss.dtype == torch.float64
    loss.sum().backward()
    assert logits.grad.dtype == torch.float64
    # the float32 teachers, renormalised in float64: the float64 loss of those values
    widened = [p.double() for p in narrow]
    torch.testing.assert_close(
        loss.detach(), UHCLoss(sets, reduction="none")(logits.detach(), widened), rtol=1e-6, atol=0
    )
    # and a float32 student with float64 teachers computes in float64 too
    assert UHCLoss(sets)(logits.detach().float(), outputs).dtype == torch.float64


def test_disconnected_graph_default_alpha_is_estimates_and_so_is_the_minimiser():
    sets = [[0, 1, 2], [1, 2, 3], [4, 5, 6], [6, 7, 5]]
    q = random_soft_labels(3, 8, 5, sharpness=1.0)
    outputs = consistent_outputs(q, sets)
    teachers = uhc_fast.TeacherSet(sets)
    loss_fn = UHCLoss(teachers, reduction="sum")
    logits = torch.zeros(3, 8, dtype=torch.float64, requires_grad=True)
    with pytest.warns(uhc_fast.DisconnectedClassesWarning, match=r"2 components"):
        loss_fn(logits, outputs)
    explicit = UHCLoss(sets, alpha=uhc_fast.DEFAULT_DISCONNECTED_ALPHA, reduction="sum")
    torch.testing.assert_close(loss_fn(logits, outputs), explicit(logits, outputs), rtol=0, atol=0)
    without = UHCLoss(sets, alpha=1e-12, reduction="sum")
    assert float((loss_fn(logits, outputs) - without(logits, outputs)).detach()) > 1e-3  # the prior is in the loss
    optimiser = torch.optim.LBFGS(
        [logits], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        optimiser.zero_grad()
        loss = loss_fn(logits, outputs)
        loss.backward()
        return loss

    optimiser.step(closure)
    expected = uhc_fast.estimate(outputs, teachers, "ce", backend="torch")  # the same default alpha
    # L-BFGS stops when the loss no longer changes in float64; along the direction only the prior fixes
    # (curvature ~ alpha) that leaves its minimiser about 1e-6 away (1.5e-6 on one machine)
    torch.testing.assert_close(torch.softmax(logits.detach(), dim=1), expected, atol=1e-5, rtol=0)
    # the estimate itself is a stationary point of the loss, to float64 rounding
    at = expected.log().requires_grad_()
    loss_fn(at, outputs).backward()
    assert float(at.grad.abs().max()) < 1e-12


@pytest.mark.interpret
def test_triton_loss_matches_the_reference():
    try:
        backends.select("triton", torch.device("cpu"))
    except RuntimeError as err:
        pytest.skip(str(err))
    sets, outputs = setup(batch=3, num_classes=6, num_teachers=3)
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(3, 6, dtype=dtype, requires_grad=True)
        teachers = [p.to(dtype) for p in outputs]
        fused = UHCLoss(sets, backend="triton", weights=[1.0, 2.0, 0.5], reduction="none")(logits, teachers)
        reference = UHCLoss(sets, backend="torch", weights=[1.0, 2.0, 0.5], reduction="none")(logits, teachers)
        atol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(fused, reference, atol=atol, rtol=0)
        (grad_fused,) = torch.autograd.grad(fused.sum(), logits)
        (grad_reference,) = torch.autograd.grad(reference.sum(), logits)
        torch.testing.assert_close(grad_fused, grad_reference, atol=atol, rtol=0)
