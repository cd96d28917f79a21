"""uhc_fast: unify heterogeneous classifiers by estimating soft labels over the union of classes.

See "Unifying Heterogeneous Classifiers with Distillation" (CVPR 2019, arXiv 1904.06062).
"""

from __future__ import annotations

from .api import estimate
from .backends import info
from .constants import DEFAULT_DISCONNECTED_ALPHA
from .errors import DisconnectedClassesWarning, InputError, UnidentifiableScalesWarning
from .loss import UHCLoss, class_balance_weights, distillation_loss
from .methods import NAMES as METHODS
from .options import Options
from .problem import TeacherSet
from .topk import estimate_topk

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DISCONNECTED_ALPHA",
    "METHODS",
    "DisconnectedClassesWarning",
    "InputError",
    "Options",
    "TeacherSet",
    "UHCLoss",
    "UnidentifiableScalesWarning",
    "class_balance_weights",
    "distillation_loss",
    "estimate",
    "estimate_topk",
    "info",
]
