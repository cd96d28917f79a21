"""Random UHC problems with known answers, shared by the test modules."""

from __future__ import annotations

import numpy as np
import torch

from uhc_fast.api import ITERATIVE


def random_class_sets(num_classes: int, num_teachers: int, coverage: float, rng: np.random.Generator):
    """N random class sets covering all K classes with a connected overlap graph.

    Each teacher gets about ``coverage * K`` classes (at least 2 where K allows); each class
    nobody drew goes to a random teacher; teacher i also takes one class of teacher i - 1, which
    chains the sets together.
    """
    size = max(min(2, num_classes), round(coverage * num_classes))
    sets = [set(rng.choice(num_classes, size=size, replace=False).tolist()) for _ in range(num_teachers)]
    for k in set(range(num_classes)) - set().union(*sets):
        sets[int(rng.integers(num_teachers))].add(k)
    for i in range(1, num_teachers):
        sets[i].add(int(rng.choice(sorted(sets[i - 1]))))
    return [sorted(s) for s in sets]


def consistent_outputs(q: torch.Tensor, class_sets, kind: str = "probs", temperatures=None, shift_scale: float = 3.0):
    """Teacher outputs generated from soft labels q through the UHC relation.

    ``probs``: ``p_i = q_{L_i} / S_i(q)``. ``logits``: ``z_il = log(q_l) / T_i + c_i`` with a random
    per-sample, per-teacher shift ``c_i`` (and temperature ``T_i``, default 1).
    """
    outputs = []
    gen = torch.Generator().manual_seed(1234)
    for i, cs in enumerate(class_sets):
        sub = q[:, cs]
        if kind == "probs":
            outputs.append(sub / sub.sum(dim=1, keepdim=True))
        else:
            t = 1.0 if temperatures is None else temperatures[i]
            shift = shift_scale * torch.randn(q.shape[0], 1, generator=gen, dtype=q.dtype)
            outputs.append(torch.log(sub) / t + shift)
    return outputs


def random_soft_labels(batch: int, num_classes: int, seed: int, dtype=torch.float64, sharpness: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(batch, num_classes, generator=gen, dtype=dtype), dim=1)


def noisy(outputs, level: float, seed: int = 0):
    """Multiplicative log-normal noise, renormalised: inconsistent but valid probabilities."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in outputs:
        p = p * torch.exp(level * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        out.append(p / p.sum(dim=1, keepdim=True))
    return out


def native_tolerance(method: str, dtype: torch.dtype) -> float:
    """Largest |soft_compiled - soft_reference| allowed for the compiled backends. Closed forms differ
    by rounding only; the iterative methods stop anywhere below the residual tolerance, so they
    agree to about that."""
    if method in ITERATIVE:
        return 1e-7 if dtype == torch.float64 else 2e-4
    return 256 * torch.finfo(dtype).eps
