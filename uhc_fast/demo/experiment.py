"""One split (teachers -> soft labels with every method -> students), and the run over all splits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from uhc_fast import TeacherSet, UHCLoss, class_balance_weights, distillation_loss, estimate

from .config import NUM_CLASSES, DemoConfig
from .data import load_digits_data, make_split
from .models import MLP, accuracy, train
from .teachers import train_teachers

# The rows besides the methods: the supervised baseline, and the student trained with UHCLoss.
CENTRALISED = "centralised"
DIRECT = "ce-direct"


@dataclass
class SplitResult:
    """One split's numbers. Accuracies are fractions in [0, 1]."""

    seed: int
    class_sets: list[list[int]]
    architectures: list[str]
    teacher_accuracy: list[float]  # each teacher on the test images of its own classes
    sizes: dict[str, int] = field(default_factory=dict)  # images in "pool", "unlabelled", "test"
    student_accuracy: dict[str, float] = field(default_factory=dict)  # row -> test accuracy
    label_accuracy: dict[str, float] = field(default_factory=dict)  # method -> argmax acc on U
    iterations: dict[str, float] = field(default_factory=dict)  # iterative method -> mean iterations
    backends: dict[str, str] = field(default_factory=dict)  # method -> the backend that estimated it


@dataclass
class DemoResult:
    config: DemoConfig
    splits: list[SplitResult]
    seconds: float

    def rows(self) -> list[str]:
        return [CENTRALISED, *self.config.methods, DIRECT]

    def student(self, row: str) -> np.ndarray:
        """``(splits,)`` test accuracies of one row (a method, ``centralised`` or ``ce-direct``)."""
        return np.array([s.student_accuracy[row] for s in self.splits])

    def labels(self, method: str) -> np.ndarray:
        """``(splits,)`` accuracies of the soft labels' argmax on the unlabelled set."""
        return np.array([s.label_accuracy[method] for s in self.splits])

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "seconds": self.seconds, "splits": [asdict(s) for s in self.splits]}


def run_split(
    x: np.ndarray, y: np.ndarray, config: DemoConfig, split: int, step: Callable[[str], object] = lambda what: None
) -> SplitResult:
    """Teachers -> soft labels with every method -> students, for one random split.

    ``step(description)`` is called after each teacher and each student (progress).
    """
    data = make_split(y, config, split)
    say = lambda what: step(f"split {split + 1}: {what}")
    outputs, teacher_acc = train_teachers(x, y, data, config, say)
    x_u, y_u = x[data.unlabelled], y[data.unlabelled]
    sizes = {"pool": len(data.pool), "unlabelled": len(data.unlabelled), "test": len(data.test)}
    result = SplitResult(data.seed, data.class_sets, data.architectures, teacher_acc, sizes)
    teachers = TeacherSet(data.class_sets, num_classes=NUM_CLASSES)
    xt_u = torch.from_numpy(x_u).float()
    xt_test, yt_test = torch.from_numpy(x[data.test]).float(), torch.from_numpy(y[data.test])

    def student_accuracy(x_train: torch.Tensor, loss_fn: Callable) -> float:
        """Train the student's architecture (an MLP 64-hidden-10) with ``loss_fn``; its test accuracy."""
        make = lambda: MLP([64, config.hidden], NUM_CLASSES)
        return accuracy(train(make, x_train, loss_fn, config, config.student_epochs, data.seed), xt_test, yt_test)

    # Centralised: the student's architecture trained with labels on everything the sources hold.
    y_pool = torch.from_numpy(y[data.pool])
    result.student_accuracy[CENTRALISED] = student_accuracy(
        torch.from_numpy(x[data.pool]).float(), lambda logits, idx: nn.functional.cross_entropy(logits, y_pool[idx])
    )
    say("centralised model")

    extra = {} if config.eps is None else {"eps": config.eps}
    for method in config.methods:
        soft, info = estimate(outputs, teachers, method, backend=config.backend, return_info=True, **extra)
        soft = torch.as_tensor(soft, dtype=torch.float32)
        result.label_accuracy[method] = float((soft.argmax(1).numpy() == y_u).mean())
        result.backends[method] = info["backend"]
        if "iterations" in info:
            result.iterations[method] = float(np.mean(np.asarray(info["iterations"])))
        weights = class_balance_weights(soft) if config.balance else None
        result.student_accuracy[method] = student_accuracy(
            xt_u, lambda logits, idx, soft=soft, weights=weights: distillation_loss(logits, soft[idx], weights)
        )
        say(f"student on {method} soft labels")

    # The direct variant: the ce objective on the student's own logits, no soft labels in between.
    loss = UHCLoss(teachers, backend=config.backend)
    tensors = [torch.from_numpy(o).float() for o in outputs]
    result.student_accuracy[DIRECT] = student_accuracy(
        xt_u, lambda logits, idx: loss(logits, [t[idx] for t in tensors])
    )
    say("student trained with UHCLoss")
    return result


@contextlib.contextmanager
def _threads(n: int):
    """Limit torch and BLAS (numpy/scikit-learn) threads for the duration of the run."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def run(config: DemoConfig | None = None, progress: bool = True) -> DemoResult:
    """Run the whole demo and return its numbers (no printing besides a tqdm progress bar on stderr)."""
    config = config or DemoConfig()
    start = time.perf_counter()
    x, y = load_digits_data()
    steps = config.splits * (config.teachers + 1 + len(config.methods) + 1)
    with _threads(config.threads), tqdm(total=steps, unit="step", disable=not progress) as bar:

        def step(what: str) -> None:
            bar.set_postfix_str(what, refresh=False)
            bar.update()

        splits = [run_split(x, y, config, s, step) for s in range(config.splits)]
    return DemoResult(config, splits, time.perf_counter() - start)
