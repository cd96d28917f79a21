"""The digits, the sources' class sets, and each split's test / labelled pool / unlabelled images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uhc_fast import TeacherSet

from .config import ARCHITECTURES, NUM_CLASSES, DemoConfig


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
