"""Training-loop use of uhc_fast: a student learns all classes from heterogeneous teachers, no labels.

Two ways, both on a torch ``Dataset`` of unlabelled inputs:

* ``soft``: estimate soft labels over the union once with :func:`uhc_fast.estimate` (here with
  ``method="ce"``), store them next to the inputs, and train with
  :func:`uhc_fast.distillation_loss` and :func:`uhc_fast.class_balance_weights` (the unlabelled
  set here is imbalanced, the test set is not).
* ``direct``: store the teachers' raw outputs next to the inputs and train on them with
  :class:`uhc_fast.UHCLoss`, the ``ce`` objective applied to the student's own logits.

The data are a synthetic Gaussian mixture so that the example needs nothing beyond torch and
numpy; ``uhc-fast demo`` tells the same story on real images. Run::

    python examples/train_student.py --epochs 5 --mode both
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import uhc_fast

NUM_CLASSES = 6
DIM = 10
# Each teacher knows only its own, overlapping subset of the classes (connected overlap graph).
CLASS_SETS = [[0, 1, 2], [2, 3, 4], [4, 5, 0], [1, 3, 5]]


class UnlabelledSet(Dataset):
    """Unlabelled inputs with what the student learns from: soft labels, or the teachers' outputs.

    Args:
        inputs: ``(B, D)`` the unlabelled samples.
        soft_labels: ``(B, K)`` precomputed soft labels over the union of classes, or None.
        teacher_outputs: N tensors ``(B, |L_i|)``, teacher ``i``'s probabilities over its classes.

    Items are ``(x, q)`` with soft labels, else ``(x, [p_1, ..., p_N])``; the default collate
    batches the latter into a list of N ``(batch, |L_i|)`` tensors, what :class:`uhc_fast.UHCLoss`
    takes.
    """

    def __init__(self, inputs: torch.Tensor, soft_labels=None, teacher_outputs=None) -> None:
        if (soft_labels is None) == (teacher_outputs is None):
            raise ValueError("give exactly one of soft_labels and teacher_outputs")
        self.inputs = inputs
        self.soft_labels = soft_labels
        self.teacher_outputs = teacher_outputs

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int):
        if self.soft_labels is not None:
            return self.inputs[i], self.soft_labels[i]
        return self.inputs[i], [t[i] for t in self.teacher_outputs]


# ---------------------------------------------------------------------- a toy world
def make_data(generator: torch.Generator, n: int, priors: torch.Tensor, means: torch.Tensor):
    """``n`` samples from a Gaussian mixture: ``x (n, DIM)``, ``y (n,)``."""
    y = torch.multinomial(priors, n, replacement=True, generator=generator)
    x = means[y] + torch.randn(n, DIM, generator=generator)
    return x, y


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_out: int, steps: int = 300) -> nn.Module:
    """A softmax regression, the stand-in for a source's privately trained classifier."""
    model = nn.Linear(x.shape[1], num_out)
    optimiser = torch.optim.LBFGS(model.parameters(), max_iter=steps)

    def closure():
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 * model.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return model.eval()


def make_teachers(generator: torch.Generator, means: torch.Tensor) -> list[nn.Module]:
    """Each source trains on its own labelled samples of its own classes only."""
    teachers = []
    for classes in CLASS_SETS:
        x, y = make_data(generator, 300, torch.ones(NUM_CLASSES), means)
        keep = torch.isin(y, torch.tensor(classes))
        local = torch.tensor([classes.index(c) for c in y[keep].tolist()])
        teachers.append(fit_linear(x[keep], local, len(classes)))
    return teachers


# ---------------------------------------------------------------------- training
def student_model() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def train(dataset: UnlabelledSet, loss_fn, epochs: int, seed: int) -> nn.Module:
    """A few epochs of Adam; ``loss_fn(logits, target)`` where target is what the dataset yields."""
    torch.manual_seed(seed)
    student = student_model()
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-2)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for epoch in range(epochs):
        total = 0.0
        for x, target in loader:
            optimiser.zero_grad()
            loss = loss_fn(student(x), target)
            loss.backward()
            optimiser.step()
            total += loss.item() * x.shape[0]
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(dataset):.4f}")
    return student.eval()


@torch.no_grad()
def balanced_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over classes of the per-class accuracy (the test set is balanced anyway)."""
    correct = (model(x).argmax(1) == y).double()
    return float(torch.stack([correct[y == k].mean() for k in range(NUM_CLASSES)]).mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--mode", choices=("soft", "direct", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(args.seed)
    means = 0.8 * torch.randn(NUM_CLASSES, DIM, generator=generator)
    teachers = make_teachers(generator, means)
    # The unlabelled set is imbalanced (class 0 six times as frequent as class 5); the test set is not.
    priors = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    x_u, _ = make_data(generator, 2000, priors, means)
    x_test, y_test = make_data(generator, 1200, torch.ones(NUM_CLASSES), means)
    with torch.no_grad():
        outputs = [torch.softmax(t(x_u), dim=1) for t in teachers]  # N x (B, |L_i|)

    results = {}
    if args.mode in ("soft", "both"):
        soft = uhc_fast.estimate(outputs, CLASS_SETS, method="ce")  # (B, K), rows sum to 1
        weights = uhc_fast.class_balance_weights(soft)  # (K,), mean 1, larger for rare classes
        print(f"soft labels: ce; class-balancing weights {[round(w, 2) for w in weights.tolist()]}")
        student = train(
            UnlabelledSet(x_u, soft_labels=soft),
            lambda logits, q: uhc_fast.distillation_loss(logits, q, class_weights=weights),
            args.epochs,
            args.seed,
        )
        results["soft"] = balanced_accuracy(student, x_test, y_test)
        print(f"student on ce soft labels: balanced test accuracy {100 * results['soft']:.1f}%")
    if args.mode in ("direct", "both"):
        loss = uhc_fast.UHCLoss(CLASS_SETS)
        print("direct: UHCLoss on the teachers' outputs")
        student = train(UnlabelledSet(x_u, teacher_outputs=outputs), loss, args.epochs, args.seed)
        results["direct"] = balanced_accuracy(student, x_test, y_test)
        print(f"student trained with UHCLoss: balanced test accuracy {100 * results['direct']:.1f}%")
    return results


if __name__ == "__main__":
    main()
