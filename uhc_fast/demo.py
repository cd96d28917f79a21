"""``uhc-fast demo``: the paper's claim end to end on real data (scikit-learn's handwritten digits).

The story, repeated over several random splits of the 1797 8x8 digit images:

1. Hold out a test set. Split the rest into a labelled pool and an unlabelled set.
2. Give the labelled pool to N sources. Each source sees only its own random, overlapping subset
   of the 10 classes (and only its share of those classes' images) and trains its own kind of
   classifier on it: logistic regression, MLPs of different sizes, an RBF SVM, a small CNN.
3. Run every teacher on the unlabelled set; estimate soft labels over all 10 classes with every
   method (``sd``, ``ce``, ``mf-p``, ``mf-lf``, ``mf-lu``) and train one student per method on
   them; train one more student directly on the teachers' outputs with :class:`uhc_fast.UHCLoss`.
4. Compare the students' test accuracy with a centralised model of the same architecture trained
   with labels on the whole labelled pool, and report how often each method's soft labels put
   their largest mass on the true class of the unlabelled samples.

scikit-learn and matplotlib (the ``demo`` extra) are imported inside functions, so that
``import uhc_fast`` never needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .api import METHODS, estimate
from .loss import UHCLoss, class_balance_weights, distillation_loss
from .problem import TeacherSet

NUM_CLASSES = 10
CENTRALISED = "centralised"
DIRECT = "ce-direct"
# Teacher architectures, cycled over the sources (name -> factory in _make_teacher).
ARCHITECTURES = ("logreg", "mlp-small", "cnn", "mlp-large", "svm-rbf", "mlp-deep")


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo's numbers depend on (besides library versions).

    Attributes:
        splits: random splits (data split, class subsets, seeds) the results are averaged over.
        teachers: number of sources; their architectures cycle through ``ARCHITECTURES``.
        min_classes, max_classes: each source's class subset size is drawn from this range.
        test_fraction: share of the data held out for testing.
        unlabelled_fraction: share of the non-test data that becomes the unlabelled set (the rest
            is the sources' labelled pool).
        student_epochs, teacher_epochs: passes over the data for the torch models.
        hidden: width of the student's (and centralised model's) hidden layer.
        batch_size, lr, weight_decay: Adam mini-batch training of the torch models.
        balance: train the soft-label students with :func:`uhc_fast.class_balance_weights`.
        eps: probabilities are clamped to it before the logit-space methods (``mf-lf``, ``mf-lu``)
            take logs; None uses :func:`uhc_fast.estimate`'s default, which keeps the teachers' far
            tails (see docs/demo.md).
        methods: the estimation methods to compare.
        backend: the uhc_fast backend for estimation and for :class:`uhc_fast.UHCLoss`.
        seed: base seed; split ``s`` uses ``seed + s``.
        threads: torch / BLAS threads (1 keeps results identical across machines).
    """

    splits: int = 5
    teachers: int = 8
    min_classes: int = 3
    max_classes: int = 6
    test_fraction: float = 0.25
    unlabelled_fraction: float = 0.4
    student_epochs: int = 80
    teacher_epochs: int = 60
    hidden: int = 128
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    balance: bool = False
    eps: float | None = None
    backend: str = "auto"
    methods: tuple[str, ...] = tuple(METHODS)
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.splits < 1:
            raise ValueError(f"splits={self.splits}: need at least 1")
        if self.teachers < 2:
            raise ValueError(f"teachers={self.teachers}: need at least 2 sources")
        if not 1 <= self.min_classes <= self.max_classes <= NUM_CLASSES:
            raise ValueError(
                f"min_classes={self.min_classes}, max_classes={self.max_classes}: need "
                f"1 <= min_classes <= max_classes <= {NUM_CLASSES}"
            )
        if self.teachers * self.max_classes < NUM_CLASSES:
            raise ValueError(
                f"teachers={self.teachers} x max_classes={self.max_classes} cannot cover {NUM_CLASSES} classes"
            )
        for name in ("test_fraction", "unlabelled_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must lie in (0, 1)")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"methods: {m!r} is not one of {tuple(METHODS)}")

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A smaller run for smoke tests: 2 splits, shorter training."""
        return replace(cls(splits=2, student_epochs=40, teacher_epochs=30), **overrides)


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


# ---------------------------------------------------------------------- models
class _MLP(nn.Module):
    def __init__(self, widths: Sequence[int], num_out: int, dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(widths[-1], num_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _CNN(nn.Module):
    """A small CNN on the 8x8 images (input ``(B, 64)``, reshaped)."""

    def __init__(self, num_out: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(32 * 4 * 4, num_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def _student(config: DemoConfig) -> nn.Module:
    return _MLP([64, config.hidden], NUM_CLASSES)


def _train(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: DemoConfig,
    epochs: int,
    seed: int,
) -> nn.Module:
    """Adam on mini-batches; ``loss_fn(logits, batch_indices)`` gives the batch loss."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], config.batch_size):
            idx = order[start : start + config.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), idx).backward()
            optimiser.step()
    model.eval()
    return model


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).double().mean())


class _TorchTeacher:
    """A torch classifier with the sklearn-like ``fit`` / ``predict_proba`` the demo uses."""

    def __init__(self, make: Callable[[int], nn.Module], config: DemoConfig, seed: int) -> None:
        self.make, self.config, self.seed = make, config, seed

    def fit(self, x: np.ndarray, y: np.ndarray) -> _TorchTeacher:
        torch.manual_seed(self.seed)
        self.model = self.make(int(y.max()) + 1)
        xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
        loss = lambda logits, idx: nn.functional.cross_entropy(logits, yt[idx])
        _train(self.model, xt, loss, self.config, self.config.teacher_epochs, self.seed)
        return self

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return torch.softmax(self.model(torch.from_numpy(x).float()).double(), dim=1).numpy()


def _make_teacher(arch: str, config: DemoConfig, seed: int):
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
        return _TorchTeacher(lambda k: _MLP([64, 128, 64], k), config, seed)
    if arch == "cnn":
        return _TorchTeacher(_CNN, config, seed)
    raise ValueError(f"unknown architecture {arch!r}")


# ---------------------------------------------------------------------- data
def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 handwritten digits shipped with scikit-learn: ``x (1797, 64)`` in [0, 1], ``y (1797,)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float64), data.target.astype(np.int64)


def draw_class_sets(rng: np.random.Generator, config: DemoConfig) -> list[list[int]]:
    """Random overlapping class subsets: every class covered by >= 2 sources, overlap graph connected."""
    for _ in range(10_000):
        sets = [
            sorted(
                rng.choice(
                    NUM_CLASSES, size=int(rng.integers(config.min_classes, config.max_classes + 1)), replace=False
                ).tolist()
            )
            for _ in range(config.teachers)
        ]
        coverage = np.zeros(NUM_CLASSES, dtype=int)
        for s in sets:
            coverage[s] += 1
        if coverage.min() >= min(2, config.teachers) and TeacherSet(sets, num_classes=NUM_CLASSES).is_connected:
            return sets
    raise RuntimeError("could not draw class subsets covering every class twice; raise teachers or max_classes")


# ---------------------------------------------------------------------- progress
class _Progress:
    """One status line on stderr, rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.done = enabled, total, 0
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        width = 24
        filled = round(width * self.done / self.total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.1f}s  {what}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------- one split
@dataclass
class SplitData:
    """One split's indices into the digits and its sources' class sets."""

    seed: int
    test: np.ndarray  # (n_test,) indices of the held-out test images
    pool: np.ndarray  # (n_pool,) the sources' labelled images
    unlabelled: np.ndarray  # (B,) the unlabelled set
    owner: np.ndarray  # (n_pool,) which source holds each pool image
    class_sets: list[list[int]]
    architectures: list[str]


def make_split(y: np.ndarray, config: DemoConfig, split: int) -> SplitData:
    """Test / labelled pool / unlabelled set, the sources' class subsets, and who holds which image."""
    from sklearn.model_selection import train_test_split

    seed = config.seed + split
    rng = np.random.default_rng(seed)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=config.test_fraction, stratify=y, random_state=seed)
    pool, unlabelled = train_test_split(rest, test_size=config.unlabelled_fraction, stratify=y[rest], random_state=seed)
    class_sets = draw_class_sets(rng, config)
    archs = [ARCHITECTURES[i % len(ARCHITECTURES)] for i in range(config.teachers)]
    # Each labelled image goes to one source, chosen among those whose class set holds its class:
    # the sources' data are private and disjoint.
    covering = [[i for i, s in enumerate(class_sets) if c in s] for c in range(NUM_CLASSES)]
    owner = np.array([covering[c][rng.integers(len(covering[c]))] for c in y[pool]])
    return SplitData(seed, test, pool, unlabelled, owner, class_sets, archs)


def train_teachers(
    x: np.ndarray, y: np.ndarray, data: SplitData, config: DemoConfig, progress: _Progress | None = None
) -> tuple[list[np.ndarray], list[float]]:
    """Train each source's classifier on its own images and classes.

    Returns:
        ``outputs``: per teacher ``(B, |L_i|)`` float64 probabilities on the unlabelled set, columns
        in the order of ``data.class_sets[i]``; ``accuracy``: per teacher, its accuracy on the test
        images of its own classes.
    """
    outputs, accuracy = [], []
    x_u = x[data.unlabelled]
    for i, (classes, arch) in enumerate(zip(data.class_sets, data.architectures, strict=True)):
        mine = data.pool[data.owner == i]
        local = {c: j for j, c in enumerate(classes)}
        teacher = _make_teacher(arch, config, data.seed * 100 + i)
        teacher.fit(x[mine], np.array([local[c] for c in y[mine]]))
        outputs.append(teacher.predict_proba(x_u))
        seen = data.test[np.isin(y[data.test], classes)]
        pred = np.asarray(classes)[teacher.predict_proba(x[seen]).argmax(1)]
        accuracy.append(float((pred == y[seen]).mean()))
        if progress is not None:
            split = data.seed - config.seed + 1
            progress.step(f"split {split}: teacher {i + 1}/{config.teachers} ({arch}, classes {classes})")
    return outputs, accuracy


def run_split(x: np.ndarray, y: np.ndarray, config: DemoConfig, split: int, progress: _Progress) -> SplitResult:
    """Teachers -> soft labels with every method -> students, for one random split."""
    data = make_split(y, config, split)
    seed, test, pool, class_sets = data.seed, data.test, data.pool, data.class_sets
    outputs, teacher_acc = train_teachers(x, y, data, config, progress)
    x_u, y_u = x[data.unlabelled], y[data.unlabelled]
    sizes = {"pool": len(pool), "unlabelled": len(data.unlabelled), "test": len(test)}
    result = SplitResult(seed, class_sets, data.architectures, teacher_acc, sizes)
    teachers = TeacherSet(class_sets, num_classes=NUM_CLASSES)
    xt_u = torch.from_numpy(x_u).float()
    xt_test, yt_test = torch.from_numpy(x[test]).float(), torch.from_numpy(y[test])

    # Centralised: the student's architecture trained with labels on everything the sources hold.
    torch.manual_seed(seed)
    y_pool = torch.from_numpy(y[pool])
    central = _train(
        _student(config),
        torch.from_numpy(x[pool]).float(),
        lambda logits, idx: nn.functional.cross_entropy(logits, y_pool[idx]),
        config,
        config.student_epochs,
        seed,
    )
    result.student_accuracy[CENTRALISED] = _accuracy(central, xt_test, yt_test)
    progress.step(f"split {split + 1}: centralised model")

    extra = {} if config.eps is None else {"eps": config.eps}
    for method in config.methods:
        soft, info = estimate(outputs, teachers, method, backend=config.backend, return_info=True, **extra)
        soft = torch.as_tensor(soft, dtype=torch.float32)
        result.label_accuracy[method] = float((soft.argmax(1).numpy() == y_u).mean())
        result.backends[method] = info["backend"]
        if "iterations" in info:
            result.iterations[method] = float(np.mean(np.asarray(info["iterations"])))
        weights = class_balance_weights(soft) if config.balance else None
        torch.manual_seed(seed)
        student = _train(
            _student(config),
            xt_u,
            lambda logits, idx, soft=soft, weights=weights: distillation_loss(logits, soft[idx], weights),
            config,
            config.student_epochs,
            seed,
        )
        result.student_accuracy[method] = _accuracy(student, xt_test, yt_test)
        progress.step(f"split {split + 1}: student on {method} soft labels")

    # The direct variant: the ce objective on the student's own logits, no soft labels in between.
    loss = UHCLoss(teachers, backend=config.backend)
    tensors = [torch.from_numpy(o).float() for o in outputs]
    torch.manual_seed(seed)
    student = _train(
        _student(config),
        xt_u,
        lambda logits, idx: loss(logits, [t[idx] for t in tensors]),
        config,
        config.student_epochs,
        seed,
    )
    result.student_accuracy[DIRECT] = _accuracy(student, xt_test, yt_test)
    progress.step(f"split {split + 1}: student trained with UHCLoss")
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
    """Run the whole demo and return its numbers (no printing besides progress on stderr)."""
    config = config or DemoConfig()
    steps_per_split = config.teachers + 1 + len(config.methods) + 1
    bar = _Progress(progress, config.splits * steps_per_split)
    start = time.perf_counter()
    x, y = load_digits_data()
    with _threads(config.threads):
        splits = [run_split(x, y, config, s, bar) for s in range(config.splits)]
    return DemoResult(config, splits, time.perf_counter() - start)


# ---------------------------------------------------------------------- report
def _std(values: np.ndarray) -> float:
    """Sample standard deviation over the splits (0 for a single split)."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _fmt(values: np.ndarray) -> str:
    return f"{100 * values.mean():5.1f} ± {100 * _std(values):3.1f}"


def format_table(result: DemoResult) -> str:
    """The results as a Markdown table: mean ± standard deviation over the splits, in %."""
    central = result.student(CENTRALISED).mean()
    lines = [
        "| soft labels from | student test accuracy (%) | vs centralised (points) | argmax of soft labels on U (%) |",
        "|---|---|---|---|",
    ]
    names = {CENTRALISED: "centralised, supervised (labels)", DIRECT: "ce, direct (UHCLoss on student logits)"}
    for row in result.rows():
        acc = result.student(row)
        gap = "" if row == CENTRALISED else f"{100 * (acc.mean() - central):+5.1f}"
        labels = _fmt(result.labels(row)) if row in result.config.methods else ""
        lines.append(f"| {names.get(row, row)} | {_fmt(acc)} | {gap} | {labels} |")
    return "\n".join(lines)


def format_report(result: DemoResult) -> str:
    c = result.config
    teacher = np.array([a for s in result.splits for a in s.teacher_accuracy])
    sizes = [len(cs) for s in result.splits for cs in s.class_sets]
    balance = "on" if c.balance else "off"
    eps = "" if c.eps is None else f", eps {c.eps:g}"
    n = result.splits[0].sizes
    head = (
        f"uhc-fast demo: scikit-learn digits (1797 images, 10 classes), {c.splits} random splits, "
        f"{c.teachers} sources with {min(sizes)}-{max(sizes)} classes each "
        f"({', '.join(ARCHITECTURES[: min(c.teachers, len(ARCHITECTURES))])}), class balancing {balance}{eps}.\n"
        f"Images per split: {n['pool']} labelled (split among the sources), {n['unlabelled']} unlabelled, "
        f"{n['test']} test.\n"
        f"Teachers' accuracy on test images of their own classes: {_fmt(teacher)} %.\n"
        f"Estimation backends: {', '.join(sorted(set(result.splits[0].backends.values())))}.\n"
    )
    iters = {
        m: np.mean([s.iterations[m] for s in result.splits]) for m in c.methods if m in result.splits[0].iterations
    }
    tail = "\nMean solver iterations: " + ", ".join(f"{m} {v:.1f}" for m, v in iters.items()) if iters else ""
    return head + "\n" + format_table(result) + "\n" + tail + f"\n({result.seconds:.0f} s)"


def plot(result: DemoResult, path: Path) -> Path:
    """Bar chart of the students' test accuracy (and the soft labels' argmax accuracy), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows() if r != CENTRALISED]
    pos = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    central = result.student(CENTRALISED)
    ax.axhspan(100 * (central.mean() - _std(central)), 100 * (central.mean() + _std(central)), color="0.85")
    ax.axhline(100 * central.mean(), color="0.3", ls="--", label="centralised, supervised")
    acc = [result.student(r) for r in rows]
    ax.bar(
        pos - 0.2,
        [100 * a.mean() for a in acc],
        0.4,
        yerr=[100 * _std(a) for a in acc],
        capsize=3,
        label="student test accuracy",
        color="tab:blue",
    )
    lab = [result.labels(r) if r in result.config.methods else None for r in rows]
    ax.bar(
        pos[[a is not None for a in lab]] + 0.2,
        [100 * a.mean() for a in lab if a is not None],
        0.4,
        yerr=[100 * _std(a) for a in lab if a is not None],
        capsize=3,
        color="tab:orange",
        label="argmax of soft labels on unlabelled set",
    )
    ax.set_xticks(pos, [r.replace(DIRECT, "ce direct\n(UHCLoss)") for r in rows])
    low = min(min(a.mean() for a in acc), central.mean()) * 100
    ax.set_ylim(max(0, math.floor(low / 5) * 5 - 5), 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Unifying heterogeneous classifiers on digits ({result.config.splits} splits, mean ± std)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- CLI
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--quick", action="store_true", help="2 splits, shorter training: under a minute")
    parser.add_argument("--splits", type=int, help=f"random splits to average over (default {d.splits})")
    parser.add_argument("--teachers", type=int, help=f"number of sources (default {d.teachers})")
    parser.add_argument("--epochs", type=int, help=f"student training epochs (default {d.student_epochs})")
    parser.add_argument("--methods", help="comma-separated methods (default: all)")
    parser.add_argument(
        "--balance",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="class-balancing weights in the students' loss (default off)",
    )
    parser.add_argument("--eps", type=float, help="probability floor before logs in mf-lf/mf-lu (default: estimate's)")
    parser.add_argument("--backend", help=f"uhc_fast backend (default {d.backend})")
    parser.add_argument("--seed", type=int, help=f"base random seed (default {d.seed})")
    parser.add_argument("--threads", type=int, help=f"torch/BLAS threads (default {d.threads}: reproducible)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the plot and JSON (default: .)")
    parser.add_argument("--plot", type=Path, help="plot path (default OUT/uhc_demo.png)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here (default OUT/uhc_demo.json)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib needed)")
    parser.add_argument("-q", "--no-progress", action="store_true", help="no progress display")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    base = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {
        "splits": args.splits,
        "teachers": args.teachers,
        "student_epochs": args.epochs,
        "balance": args.balance,
        "eps": args.eps,
        "backend": args.backend,
        "seed": args.seed,
        "threads": args.threads,
        "methods": tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
    }
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _command(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as err:
        if args.no_plot and err.name == "matplotlib":
            pass
        else:
            raise SystemExit(
                f"uhc-fast demo needs the demo extra ({err.name} is missing): pip install 'uhc_fast[demo]'"
            ) from err
    config = config_from_args(args)
    result = run(config, progress=not args.no_progress)
    print(format_report(result))
    out = args.out
    json_path = args.json or out / "uhc_demo.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result.to_json(), indent=1))
    print(f"numbers written to {json_path}")
    if not args.no_plot:
        print(f"plot written to {plot(result, args.plot or out / 'uhc_demo.png')}")
    return 0


def register(subparsers) -> None:
    """Add the ``demo`` subcommand to the ``uhc-fast`` CLI."""
    parser = subparsers.add_parser(
        "demo",
        help="reproduce the paper's claim on scikit-learn's digits",
        description=__doc__.split("\n\n")[0],
    )
    _add_arguments(parser)
    parser.set_defaults(func=_command)


def main(argv: list[str] | None = None) -> int:
    """``python -m uhc_fast.demo``: the demo without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="uhc-fast demo", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return _command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
