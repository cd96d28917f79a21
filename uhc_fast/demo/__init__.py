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

The demo is a client of uhc_fast's public API only. Its modules, in the order of the story:
``config`` (:class:`DemoConfig`), ``data`` (the digits, class sets and splits), ``models`` (the
torch networks and their training loop), ``teachers`` (the heterogeneous sources), ``experiment``
(one split, all splits, :class:`DemoResult`), ``report`` (table, plot, JSON) and ``cli``.

scikit-learn and matplotlib (the ``demo`` extra) are imported inside functions, so that
``import uhc_fast.demo`` never needs them.
"""

from __future__ import annotations

from .cli import config_from_args, main, register
from .config import ARCHITECTURES, NUM_CLASSES, DemoConfig
from .data import SplitData, draw_class_sets, load_digits_data, make_split
from .experiment import CENTRALISED, DIRECT, DemoResult, SplitResult, run, run_split
from .report import format_report, format_table, plot, write_json
from .teachers import train_teachers

__all__ = [
    "ARCHITECTURES",
    "CENTRALISED",
    "DIRECT",
    "NUM_CLASSES",
    "DemoConfig",
    "DemoResult",
    "SplitData",
    "SplitResult",
    "config_from_args",
    "draw_class_sets",
    "format_report",
    "format_table",
    "load_digits_data",
    "main",
    "make_split",
    "plot",
    "register",
    "run",
    "run_split",
    "train_teachers",
    "write_json",
]
