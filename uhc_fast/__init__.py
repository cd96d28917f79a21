"""uhc_fast: unify heterogeneous classifiers by estimating soft labels over the union of classes.

See "Unifying Heterogeneous Classifiers with Distillation" (CVPR 2019, arXiv 1904.06062).
"""

from __future__ import annotations

from .api import METHODS, estimate
from .dispatch import info
from .inputs import DEFAULT_DISCONNECTED_ALPHA
from .loss import UHCLoss, class_balance_weights, distillation_loss
from .problem import DisconnectedClassesWarning, TeacherSet

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DISCONNECTED_ALPHA",
    "METHODS",
    "DisconnectedClassesWarning",
    "TeacherSet",
    "UHCLoss",
    "class_balance_weights",
    "distillation_loss",
    "estimate",
    "info",
]
