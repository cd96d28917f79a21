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
