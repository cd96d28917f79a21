"""Batched solves of grounded graph Laplacians, the Newton systems of `ce` and mf-lf's gauge.

Both systems are weighted graph Laplacians over the teachers (symmetric, non-positive off the
diagonal, rows summing to zero), singular only by the common shift. Grounding one teacher (its
unknown fixed at 0) removes the shift. The rest is solved by elimination in which every pivot and
every update is a sum of non-negative terms (the Grassmann-Taksar-Heyman form of Gaussian
elimination): a Laplacian whose links span many orders of magnitude (teachers joined only through
a class of mass 1e-10) keeps the relative precision of its weakest link, where Cholesky on the
assembled matrix would lose it to cancellation in the pivots.
"""

from __future__ import annotations

import torch


def grounded_laplacian_solve(
    links: torch.Tensor, ground: torch.Tensor, rhs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``(diag(links.sum(-1) + ground) - links) x = rhs`` for a batch of systems.

    Args:
        links: ``(B, n, n)`` symmetric link weights >= 0 (the diagonal is ignored).
        ground: ``(B, n)`` weights >= 0 of each node's links to the grounded node.
        rhs: ``(B, n)`` or ``(B, n, m)``.

    Returns:
        ``(x, isolated)``: the solution shaped like ``rhs``, and ``(B,)`` bool marking systems in
        which some nodes have no path to ground (a disconnected graph). Each such group of nodes is
        grounded at its last node instead (which gets ``x = 0``): its values are then relative to
        that node, the only thing the system determines about them.
    """
    vector = rhs.dim() == 2
    b = (rhs.unsqueeze(-1) if vector else rhs).clone()
    w, g = links.clone(), ground.clone()
    n = w.shape[-1]
    pivots = []
    for k in range(n):
        d = w[:, k, k + 1 :].sum(dim=1) + g[:, k]  # links to the nodes left, and (through those gone) to ground
        positive = d > 0
        safe = torch.where(positive, d, 1)
        pivots.append(torch.where(positive, d, 0))
        f = w[:, k + 1 :, k] / safe[:, None]  # the multipliers are links too: no sign changes anywhere
        w[:, k + 1 :, k + 1 :] += f[:, :, None] * w[:, k, None, k + 1 :]
        g[:, k + 1 :] += f * g[:, k, None]
        b[:, k + 1 :] += f[:, :, None] * b[:, k, None]
    x = torch.zeros_like(b)
    for k in range(n - 1, -1, -1):
        acc = b[:, k] + (w[:, k, k + 1 :, None] * x[:, k + 1 :]).sum(dim=1)
        d = pivots[k]
        x[:, k] = torch.where((d > 0)[:, None], acc / torch.where(d > 0, d, 1)[:, None], 0)
    isolated = torch.stack(pivots, dim=1).le(0).any(dim=1) if n else torch.zeros(b.shape[0], dtype=torch.bool)
    return (x.squeeze(-1) if vector else x), isolated


def grounded_laplacian_solve_flows(
    links: torch.Tensor, ground: torch.Tensor, flows: torch.Tensor, flows_to_ground: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grounded_laplacian_solve` for ``rhs_i = sum_j flows_ij + flows_to_ground_i``.

    ``flows`` ``(B, n, n)`` is antisymmetric (exactly: ``flows_ji == -flows_ij`` in floating point,
    zero diagonal) and ``flows_to_ground`` ``(B, n)`` holds each node's flow to the grounded node.
    The elimination carries the flows, not their sums: merging node k into the rest adds to the
    flow between j and m the exactly antisymmetric ``f_j F_km - f_m F_kj``, so the right-hand side a
    group of nodes presents to the rest is the sum of the flows that leave the group, never formed
    from the group's own (larger, cancelling) internal flows. Where a block of teachers is joined to
    the rest only through classes of tiny mass, its internal flows still far from balanced, the
    block's step is set by those tiny leaving flows; summed from the internal ones it drowned in
    their rounding (rows of confident teachers reported converged 0.3 off).
    """
    w, g = links.clone(), ground.clone()
    f_net, f_g = flows.clone(), flows_to_ground.clone()
    n = w.shape[-1]
    pivots, rhs = [], []
    for k in range(n):
        rest = slice(k + 1, None)
        d = w[:, k, rest].sum(dim=1) + g[:, k]
        positive = d > 0
        safe = torch.where(positive, d, 1)
        pivots.append(torch.where(positive, d, 0))
        rhs.append(f_net[:, k, rest].sum(dim=1) + f_g[:, k])
        f = w[:, rest, k] / safe[:, None]
        fk = g[:, k] / safe
        out = f_net[:, k, rest]  # F_kj for the nodes left
        w[:, rest, rest] += f[:, :, None] * w[:, k, None, rest]
        g[:, rest] += f * g[:, k, None]
        f_net[:, rest, rest] += f[:, :, None] * out[:, None, :] - out[:, :, None] * f[:, None, :]
        f_g[:, rest] += f * f_g[:, k, None] - fk[:, None] * out
    x = torch.zeros_like(g)
    for k in range(n - 1, -1, -1):
        acc = rhs[k] + (w[:, k, k + 1 :] * x[:, k + 1 :]).sum(dim=1)
        d = pivots[k]
        x[:, k] = torch.where(d > 0, acc / torch.where(d > 0, d, 1), 0)
    isolated = torch.stack(pivots, dim=1).le(0).any(dim=1) if n else torch.zeros(g.shape[0], dtype=torch.bool)
    return x, isolated
