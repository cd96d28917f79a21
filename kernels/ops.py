"""``torch.library`` custom ops around the kernels, so that ``torch.compile`` sees one opaque op each.

- ``uhc_fast::triton_solve``: a solver launch (:func:`uhc_fast.kernels.launch.solve`) from plain
  tensors, lists and numbers; its fake implementation gives the output shapes.
- ``uhc_fast::triton_loss`` (returns ``(loss (B,), lse (B, N))``) and
  ``uhc_fast::triton_loss_backward``: the direct `ce` loss, differentiable in the student logits
  (first order; the teachers' values and weights get no gradient).
"""

from __future__ import annotations

import torch

from . import launch as _launch
from . import plan as _plan
from .inputs import KIND_CODES
from .loss import loss_backward as _loss_backward
from .loss import loss_forward as _loss_forward

_NAMES = {code: name for name, code in KIND_CODES.items()}


# ---------------------------------------------------------------------- solvers
@torch.library.custom_op("uhc_fast::triton_solve", mutates_args=())
def solve(
    tensors: list[torch.Tensor],
    kinds: list[int],
    tables: torch.Tensor,
    weights: torch.Tensor,
    system: torch.Tensor | None,
    method: str,
    num_classes: int,
    float64_out: bool,
    temperature: float,
    eps: float,
    tol: float,
    max_iter: int,
    sum_tolerances: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outputs of :func:`uhc_fast.kernels.launch.solve` (``kinds``: the teachers' codes of
    :data:`uhc_fast.kernels.inputs.KIND_CODES`; ``tables``: the layout's plan buffer)."""
    plan = _plan.Plan.from_tables(tables)
    settings = _launch.Settings(
        temperature=temperature, eps=eps, tol=tol, max_iter=max_iter, sum_tolerances=tuple(sum_tolerances)
    )
    out_dtype = torch.float64 if float64_out else torch.float32
    names = [_NAMES[code] for code in kinds]
    return _launch.solve(method, tensors, names, plan, weights, system, out_dtype, settings)


@solve.register_fake
def _solve_fake(tensors, kinds, tables, weights, system, method, num_classes, float64_out, *rest):
    like = tensors[0]
    batch, dtype = like.shape[0], torch.float64 if float64_out else torch.float32
    return (
        like.new_empty(batch, num_classes, dtype=dtype),
        like.new_empty(batch, dtype=torch.int32),
        like.new_empty(batch, dtype=torch.bool),
        *(like.new_empty(batch, dtype=dtype) for _ in range(3)),
        like.new_empty(weights.shape[0], 4, dtype=torch.int64),
    )


# ---------------------------------------------------------------------- the training loss
def _loss_dtype(logits, values):
    return torch.float64 if torch.float64 in (logits.dtype, values.dtype) else torch.float32


@torch.library.custom_op("uhc_fast::triton_loss", mutates_args=())
def triton_loss(
    logits: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor, block_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct `ce` loss: ``(loss (B,), lse (B, N))`` for student logits ``(B, K)``."""
    return _loss_forward(logits, values, weights, tables)


@triton_loss.register_fake
def _(logits, values, weights, tables, block_rows):
    dtype = _loss_dtype(logits, values)
    batch = logits.shape[0]
    return logits.new_empty(batch, dtype=dtype), logits.new_empty(batch, weights.shape[0], dtype=dtype)


@torch.library.custom_op("uhc_fast::triton_loss_backward", mutates_args=())
def triton_loss_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    tables: torch.Tensor,
    lse: torch.Tensor,
    block_rows: int,
) -> torch.Tensor:
    """``grad[b] * dloss[b]/dlogits``, ``(B, K)`` in the logits' dtype."""
    return _loss_backward(grad, logits, values, weights, tables, lse, block_rows)


@triton_loss_backward.register_fake
def _(grad, logits, values, weights, tables, lse, block_rows):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, values, weights, tables, block_rows = inputs
    ctx.block_rows = block_rows
    ctx.save_for_backward(logits, values, weights, tables, output[1])


def _backward(ctx, grad_loss, grad_lse):
    logits, values, weights, tables, lse = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        if grad_loss is None:
            grad_loss = torch.zeros(logits.shape[0], dtype=lse.dtype, device=logits.device)
        grad_logits = triton_loss_backward(grad_loss, logits, values, weights, tables, lse, ctx.block_rows)
    return grad_logits, None, None, None, None


triton_loss.register_autograd(_backward, setup_context=_setup_context)


def loss(logits: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor, block_rows: int):
    """Per-sample direct `ce` loss ``(B,)`` with autograd to ``logits``."""
    return triton_loss(logits, values, weights, tables, block_rows)[0]
