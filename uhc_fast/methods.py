"""The method registry: every public ``method=`` string and what it needs, written once.

This module imports nothing from the package, so every layer (API, reference, backends, streaming,
CLI) can read it. The compiled core mirrors the codes in ``csrc/core/constants.h``; a test
compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One estimation method.

    Attributes:
        name: the public ``method=`` string.
        value_kind: what its solver reads: ``"probs"`` (probabilities renormalised per teacher) or
            ``"logits"`` (logits at temperature 1, ``log(max(p, eps))`` for probability inputs).
        iterative: whether it iterates to a tolerance (and reports iterations and residuals).
        needs_system: whether it needs the mf-lf system of the mask and weights
            (:meth:`uhc_fast.problem.Layout.mf_lf_system`).
        code: its code in the compiled core.
        summary: one line for help texts.
    """

    name: str
    value_kind: str
    iterative: bool
    needs_system: bool
    code: int
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sd", "probs", False, False, 0, "zero-pad and average (the paper's naive baseline)"),
        Method("ce", "probs", True, False, 1, "maximum likelihood of the relation (the default)"),
        Method("mf-p", "probs", True, False, 2, "rank-one factorisation in probability space"),
        Method("mf-lf", "logits", False, True, 3, "least squares in logit space, one shift per teacher"),
        Method("mf-lu", "logits", True, True, 4, "logit space with an unknown scale per teacher"),
    )
}
NAMES: tuple[str, ...] = tuple(METHODS)
ITERATIVE: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.iterative)


def get(name: str) -> Method:
    """The method called ``name``; ValueError listing the choices otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method={name!r}: expected one of {NAMES}") from None
