"""The demo's settings: :class:`DemoConfig` and the constants of the digits task."""

from __future__ import annotations

from dataclasses import dataclass, replace

from uhc_fast import METHODS

NUM_CLASSES = 10
# Teacher architectures, cycled over the sources (built by ``teachers.make_teacher``).
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
