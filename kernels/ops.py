"""``torch.library`` custom ops around the kernels, so ``torch.compile`` sees one opaque op each.

Every op takes plain tensors (packed values, weights, the ``(N, K)`` column map, the ``(N, N)``
mf-lf system) and returns fresh tensors; ``register_fake`` gives their shapes for tracing and
``register_autograd`` makes ``loss`` differentiable in the student logits (first order only; the
teachers' values and weights get no gradient).

Ops: ``uhc_fast::triton_sd``, ``triton_ce``, ``triton_mf_p``, ``triton_mf_lf``, ``triton_mf_lu``,
``triton_loss`` (returns ``(loss (B,), lse (B, N))``) and ``triton_loss_backward``.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype
from .ce import ce as _ce
from .loss import loss_backward as _loss_backward
from .loss import loss_forward as _loss_forward
from .mf import mf_lf as _mf_lf
from .mf import mf_lu as _mf_lu
from .mf import mf_p as _mf_p
from .sd import sd as _sd


def _acc(values: torch.Tensor) -> torch.dtype:
    return compute_dtype(values.dtype)[0]


def _solution_fake(values, cmap):
    batch = values.shape[0]
    soft = values.new_empty(batch, cmap.shape[1], dtype=_acc(values))
    return soft, values.new_empty(batch, dtype=torch.int32), values.new_empty(batch, dtype=_acc(values))


# ---------------------------------------------------------------------- solvers
@torch.library.custom_op("uhc_fast::triton_sd", mutates_args=())
def triton_sd(values: torch.Tensor, weights: torch.Tensor, cmap: torch.Tensor) -> torch.Tensor:
    """`sd` soft labels ``(B, K)`` from packed probabilities ``(B, nnz)``."""
    return _sd(values.contiguous(), weights.contiguous(), cmap)


@triton_sd.register_fake
def _(values, weights, cmap):
    return values.new_empty(values.shape[0], cmap.shape[1], dtype=_acc(values))


@torch.library.custom_op("uhc_fast::triton_ce", mutates_args=())
def triton_ce(
    values: torch.Tensor, weights: torch.Tensor, cmap: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ce` ``(soft (B, K), iterations (B,) int32, residual (B,))``."""
    return _ce(values.contiguous(), weights.contiguous(), cmap, tol, max_iter)


@triton_ce.register_fake
def _(values, weights, cmap, tol, max_iter):
    return _solution_fake(values, cmap)


@torch.library.custom_op("uhc_fast::triton_mf_p", mutates_args=())
def triton_mf_p(
    values: torch.Tensor, weights: torch.Tensor, cmap: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mf-p` ``(soft (B, K), iterations (B,) int32, residual (B,))``."""
    return _mf_p(values.contiguous(), weights.contiguous(), cmap, tol, max_iter)


@triton_mf_p.register_fake
def _(values, weights, cmap, tol, max_iter):
    return _solution_fake(values, cmap)


@torch.library.custom_op("uhc_fast::triton_mf_lf", mutates_args=())
def triton_mf_lf(values: torch.Tensor, weights: torch.Tensor, cmap: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
    """`mf-lf` soft labels ``(B, K)`` from packed logits; ``system`` is the ``(N, N)`` ``G^+``."""
    return _mf_lf(values.contiguous(), weights.contiguous(), cmap, system)


@triton_mf_lf.register_fake
def _(values, weights, cmap, system):
    return values.new_empty(values.shape[0], cmap.shape[1], dtype=_acc(values))


@torch.library.custom_op("uhc_fast::triton_mf_lu", mutates_args=())
def triton_mf_lu(
    values: torch.Tensor, weights: torch.Tensor, cmap: torch.Tensor, system: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mf-lu` ``(soft (B, K), iterations (B,) int32, residual (B,))``."""
    return _mf_lu(values.contiguous(), weights.contiguous(), cmap, system, tol, max_iter)


@triton_mf_lu.register_fake
def _(values, weights, cmap, system, tol, max_iter):
    return _solution_fake(values, cmap)


# ---------------------------------------------------------------------- the training loss
def _loss_dtype(logits, values):
    return compute_dtype(torch.promote_types(logits.dtype, values.dtype))[0]


@torch.library.custom_op("uhc_fast::triton_loss", mutates_args=())
def triton_loss(
    logits: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, cmap: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct `ce` loss: ``(loss (B,), lse (B, N))`` for student logits ``(B, K)``."""
    return _loss_forward(logits, values, weights.contiguous(), cmap)


@triton_loss.register_fake
def _(logits, values, weights, cmap):
    dtype = _loss_dtype(logits, values)
    batch = logits.shape[0]
    return logits.new_empty(batch, dtype=dtype), logits.new_empty(batch, cmap.shape[0], dtype=dtype)


@torch.library.custom_op("uhc_fast::triton_loss_backward", mutates_args=())
def triton_loss_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    cmap: torch.Tensor,
    lse: torch.Tensor,
) -> torch.Tensor:
    """``grad[b] * dloss[b]/dlogits``, ``(B, K)`` in the logits' dtype."""
    return _loss_backward(grad, logits, values, weights.contiguous(), cmap, lse)


@triton_loss_backward.register_fake
def _(grad, logits, values, weights, cmap, lse):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, values, weights, cmap = inputs
    ctx.save_for_backward(logits, values, weights, cmap, output[1])


def _backward(ctx, grad_loss, grad_lse):
    logits, values, weights, cmap, lse = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        if grad_loss is None:
            grad_loss = torch.zeros(logits.shape[0], dtype=lse.dtype, device=logits.device)
        grad_logits = triton_loss_backward(grad_loss, logits, values, weights, cmap, lse)
    return grad_logits, None, None, None


triton_loss.register_autograd(_backward, setup_context=_setup_context)


def loss(logits: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, cmap: torch.Tensor) -> torch.Tensor:
    """Per-sample direct `ce` loss ``(B,)`` with autograd to ``logits``."""
    return triton_loss(logits, values, weights, cmap)[0]
