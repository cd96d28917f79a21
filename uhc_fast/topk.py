"""`uhc_fast.estimate_topk`: teachers' top-k outputs -> soft labels over each sample's union of ids.

Language-model distillation stores each teacher's top-k token ids and probabilities per position
(a 150k-id vocabulary is too large to store), renormalised over those k ids. A teacher that
reports only its top-k ids for sample b reports the distribution conditioned on them:
``p_ib(l) = q_bl / sum_{k in L_i(b)} q_bk``, the UHC relation with a class set per sample. Per
sample, the union ``U(b)`` of the teachers' listed ids plays the role of the K classes and every
method is solved over it (``../shared/uhc-math.md``, "Per-sample class sets"): ``sd`` averages the
truncated distributions (the usual practice, biased towards ids many teachers list), ``ce`` is the
maximum likelihood, exact on consistent teachers.

Backends: ``cpu`` (the compiled core, csrc/core/topk.h: one sample per thread at a time, the dense
``ce`` solver on a per-sample structure), ``triton`` (kernels/topk.py, CUDA tensors; CPU tensors
under ``TRITON_INTERPRET=1``) and ``torch`` (uhc_fast/reference/topk.py: the definition of correct,
batched, on any device). ``cuda`` means the Triton kernel here (there is no compiled CUDA top-k
solver). This module is the entry point; the checked inputs are :mod:`uhc_fast.topk_inputs`, the
choice and launch of a backend :mod:`uhc_fast.backends.topk`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .api import convergence
from .backends.topk import solve
from .constants import DEFAULT_DISCONNECTED_ALPHA
from .errors import InputError
from .options import Options
from .topk_inputs import TopkBatch, TopkSolution, convert


def estimate_topk(
    indices: Sequence,
    values: Sequence,
    method: str = "ce",
    *,
    inputs: str | Sequence[str] = "probs",
    weights: Sequence[float] | torch.Tensor | None = None,
    vocab_maps: Sequence | None = None,
    vocab_size: int | None = None,
    top_k: int | None = None,
    alpha: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    backend: str = "auto",
    return_info: bool = False,
):
    """Merge N teachers' top-k outputs into soft labels over each sample's union of ids.

    Args:
        indices: N integer arrays, teacher ``i`` shaped ``(B, k_i)`` (ragged k across teachers):
            ids in a shared vocabulary, or in teacher i's own vocabulary when ``vocab_maps[i]`` is
            given; ``-1`` marks unused slots. Torch tensors (one device) or numpy arrays.
        values: N arrays ``(B, k_i)`` beside them: probabilities of the listed ids (renormalised
            per row over the listed ids: the relation is about the distribution conditioned on
            them), or log-probabilities / logits with ``inputs="logprobs"`` / ``"logits"``
            (softmax over the listed ids). Values of unused slots are ignored.
        method: ``"ce"`` (maximum likelihood, the default) or ``"sd"`` (average of the truncated
            distributions: the usual practice and the paper's biased baseline).
        inputs: ``"probs"``, ``"logprobs"`` or ``"logits"``, or one of those per teacher.
        weights: ``(N,)`` positive per-teacher weights (default 1).
        vocab_maps: N entries, each None (the teacher's ids are shared ids) or a 1-D integer array
            mapping teacher i's ids to shared ids (-1: no shared id; such slots are dropped, which
            leaves the teacher's distribution conditioned on the rest). A map must be one-to-one.
        vocab_size: shared ids must be below it (default: no bound).
        top_k: keep the ``top_k`` largest soft labels per sample, renormalised to sum 1 (the
            output then has exactly ``top_k`` columns); default: the whole union.
        alpha: weight of a uniform prior teacher over each sample's union. Default: on samples
            whose teachers' overlap graph is disconnected (teachers that agree on nothing) 0.01,
            elsewhere 0 (counted in ``info["disconnected_samples"]``; no warning per sample).
        tol, max_iter: as in :func:`uhc_fast.estimate` (`ce`).
        backend: ``"auto"`` (the compiled CPU core for CPU tensors, the Triton kernel for CUDA
            tensors, else the torch reference), ``"cpu"``, ``"triton"`` (or ``"cuda"``, which
            means it here), ``"torch"``.
        return_info: also return a dict of diagnostics.

    Returns:
        ``(ids, soft)``: ``(B, M)`` int64 ids of each sample's union sorted by decreasing soft
        label (ties by increasing id), ``-1``-padded, and ``(B, M)`` soft labels summing to 1 per
        row (0 in padding; a sample where no teacher listed anything is all padding). ``M`` is the
        largest union, or ``top_k``. Tensors on the inputs' device (float64 soft labels if any
        values are float64, else float32), or numpy arrays when every input was numpy. With
        ``return_info``, ``(ids, soft, info)``: ``method``, ``backend``, ``alpha``,
        ``union_size`` ``(B,)``, ``disconnected`` ``(B,)`` and ``disconnected_samples``,
        ``empty_samples``, ``kept_mass`` ``(B,)`` and for `ce` ``tol``, ``iterations``,
        ``residual``, ``converged``, ``step``, ``abs_residual`` as in :func:`uhc_fast.estimate`.

    Raises:
        InputError (a ValueError) naming the teacher, the row and/or the argument: ids below -1,
        beyond a vocabulary map or ``vocab_size``, an id listed twice in a row, NaN (or +Inf)
        values, negative probabilities or positive log-probabilities, rows whose listed
        probabilities are all zero or sum above 1, mismatched shapes, lengths or devices.
        TypeError for non-integer ids or non-float values.
    """
    options = Options(
        method=method,
        inputs=inputs,
        weights=weights,
        alpha=alpha,
        tol=tol,
        max_iter=max_iter,
        backend=backend,
        topk=True,
    )
    batch = convert(indices, values, options, vocab_maps=vocab_maps, vocab_size=vocab_size)
    top_k = _top_k(top_k)
    solution = solve(batch, top_k if top_k is not None else batch.total_slots)
    ids, soft = solution.ids, solution.soft
    if top_k is None:
        width = int(solution.union_size.max()) if solution.union_size.numel() else 0
        if width < ids.shape[1]:
            ids, soft = ids[:, :width].contiguous(), soft[:, :width].contiguous()
    info = diagnostics(batch, solution) if return_info else None
    if batch.numpy_out:
        ids, soft = ids.cpu().numpy(), soft.cpu().numpy()
    return (ids, soft, info) if return_info else (ids, soft)


def _top_k(top_k) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InputError("must be an int >= 1", argument="top_k", value=repr(top_k))
    return int(top_k)


def diagnostics(batch: TopkBatch, solution: TopkSolution) -> dict:
    """The ``info`` dict of :func:`estimate_topk`."""
    options = batch.options
    union = solution.union_size
    details = {
        "method": options.method,
        "backend": solution.backend,
        "alpha": batch.alpha,
        "default_alpha": None if batch.alpha is not None else DEFAULT_DISCONNECTED_ALPHA,
        "union_size": union,
        "max_union": int(union.max()) if union.numel() else 0,
        "disconnected": solution.disconnected,
        "disconnected_samples": int(solution.disconnected.sum()),
        "empty_samples": int((union == 0).sum()),
        "kept_mass": solution.kept,
    }
    if options.method == "ce":
        details.update(convergence(options, solution))
    return details
