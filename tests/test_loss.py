"""UHCLoss, distillation_loss and class_balance_weights."""

import numpy as np
import pytest
import torch

import uhc_fast
from uhc_fast import UHCLoss, class_balance_weights, distillation_loss

from .problems import consistent_outputs, noisy, random_class_sets, random_soft_labels


def setup(batch=6, num_classes=9, num_teachers=4, seed=0):
    sets = random_class_sets(num_classes, num_teachers, 0.4, np.random.default_rng(seed))
    q = random_soft_labels(batch, num_classes, seed)
    return sets, noisy(consistent_outputs(q, sets), 0.4, seed)


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
    with pytest.raises(ValueError, match=r"backend='gpu'"):
        UHCLoss(sets, backend="gpu")


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
