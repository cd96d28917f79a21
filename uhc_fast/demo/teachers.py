"""The heterogeneous sources: each trains its own kind of classifier on its own images and classes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .config import DemoConfig
from .data import SplitData
from .models import CNN, MLP, train


class TorchTeacher:
    """A torch classifier with the sklearn-like ``fit`` / ``predict_proba`` the demo uses."""

    def __init__(self, make: Callable[[int], nn.Module], config: DemoConfig, seed: int) -> None:
        self.make, self.config, self.seed = make, config, seed

    def fit(self, x: np.ndarray, y: np.ndarray) -> TorchTeacher:
        xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
        loss = lambda logits, idx: nn.functional.cross_entropy(logits, yt[idx])
        make = lambda: self.make(int(y.max()) + 1)
        self.model = train(make, xt, loss, self.config, self.config.teacher_epochs, self.seed)
        return self

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return torch.softmax(self.model(torch.from_numpy(x).float()).double(), dim=1).numpy()


def make_teacher(arch: str, config: DemoConfig, seed: int):
    """An unfitted classifier of architecture ``arch`` (one of ``ARCHITECTURES``)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    if arch == "logreg":
        return LogisticRegression(C=10.0, max_iter=2000)
    if arch == "mlp-small":
        return MLPClassifier((32,), alpha=1e-3, max_iter=600, random_state=seed)
    if arch == "mlp-large":
        return MLPClassifier((256,), alpha=1e-3, max_iter=600, random_state=seed)
    if arch == "svm-rbf":
        # Platt-scaled probabilities, fitted on held-out folds and applied to one SVM on all data.
        return CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), cv=3, ensemble=False)
    if arch == "mlp-deep":
        return TorchTeacher(lambda k: MLP([64, 128, 64], k), config, seed)
    if arch == "cnn":
        return TorchTeacher(CNN, config, seed)
    raise ValueError(f"unknown architecture {arch!r}")


def train_teachers(
    x: np.ndarray, y: np.ndarray, data: SplitData, config: DemoConfig, step: Callable[[str], object] = lambda what: None
) -> tuple[list[np.ndarray], list[float]]:
    """Train each source's classifier on its own images and classes.

    Returns:
        ``outputs``: per teacher ``(B, |L_i|)`` float64 probabilities on the unlabelled set, columns
        in the order of ``data.class_sets[i]``; ``accuracy``: per teacher, its accuracy on the test
        images of its own classes. ``step(description)`` is called after each teacher (progress).
    """
    outputs, accuracy = [], []
    x_u = x[data.unlabelled]
    for i, (classes, arch) in enumerate(zip(data.class_sets, data.architectures, strict=True)):
        mine = data.pool[data.owner == i]
        local = {c: j for j, c in enumerate(classes)}
        teacher = make_teacher(arch, config, data.seed * 100 + i)
        teacher.fit(x[mine], np.array([local[c] for c in y[mine]]))
        outputs.append(teacher.predict_proba(x_u))
        seen = data.test[np.isin(y[data.test], classes)]
        pred = np.asarray(classes)[teacher.predict_proba(x[seen]).argmax(1)]
        accuracy.append(float((pred == y[seen]).mean()))
        step(f"teacher {i + 1}/{config.teachers} ({arch}, classes {classes})")
    return outputs, accuracy
