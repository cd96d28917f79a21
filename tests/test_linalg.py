"""``uhc_fast.linalg.grounded_laplacian_solve``: the Newton systems of `ce` and mf-lf's gauge."""

from __future__ import annotations

import pytest
import torch

from uhc_fast.linalg import grounded_laplacian_solve, grounded_laplacian_solve_flows


def random_system(batch: int, n: int, seed: int, dtype=torch.float64, density: float = 0.6, spread=(0.0, 0.0)):
    """Symmetric links (weights log-uniform in 10^spread, some zero) and ground links, every node
    reaching ground through the chain 0 - 1 - ... - (n-1) - ground."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = spread
    weights = lambda *shape: 10 ** (lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64))
    links = weights(batch, n, n) * (torch.rand(batch, n, n, generator=gen, dtype=torch.float64) < density)
    chain = torch.diag_embed(weights(batch, n - 1), offset=1)
    links = torch.triu(links, 1) + chain
    links = links + links.transpose(1, 2)
    ground = weights(batch, n) * (torch.rand(batch, n, generator=gen, dtype=torch.float64) < density / 2)
    ground[:, -1] = weights(batch)
    return links.to(dtype), ground.to(dtype)


def assembled(links: torch.Tensor, ground: torch.Tensor) -> torch.Tensor:
    off = links.clone()
    off.diagonal(dim1=1, dim2=2).zero_()
    return torch.diag_embed(off.sum(dim=2) + ground) - off


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17])
def test_matches_torch_solve_in_float64(n):
    links, ground = random_system(6, n, n)
    links.diagonal(dim1=1, dim2=2).fill_(123.0)  # the diagonal is ignored
    gen = torch.Generator().manual_seed(100 + n)
    rhs = torch.randn(6, n, generator=gen, dtype=torch.float64)
    saved = (links.clone(), ground.clone(), rhs.clone())
    x, isolated = grounded_laplacian_solve(links, ground, rhs)
    expected = torch.linalg.solve(assembled(links, ground), rhs)
    assert x.shape == rhs.shape and x.dtype == torch.float64 and not bool(isolated.any())
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))
    # several right-hand sides at once, and the inputs untouched
    many = torch.randn(6, n, 3, generator=gen, dtype=torch.float64)
    xm, _ = grounded_laplacian_solve(links, ground, many)
    torch.testing.assert_close(xm, torch.linalg.solve(assembled(links, ground), many), rtol=1e-10, atol=1e-10)
    for before, after in zip(saved, (links, ground, rhs)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("seed", range(4))
def test_float32_keeps_the_relative_precision_of_weak_links(seed):
    """Links spanning 1e-10..1: every component of the float32 solution keeps float32's relative
    precision (a solve of the assembled matrix loses it to cancellation in the pivots)."""
    links, ground = random_system(32, 7, seed, torch.float32, spread=(-10.0, 0.0))
    gen = torch.Generator().manual_seed(seed)
    rhs = torch.rand(32, 7, generator=gen, dtype=torch.float32) + 0.1  # positive: no cancellation in the answer
    x, isolated = grounded_laplacian_solve(links, ground, rhs)
    assert x.dtype == torch.float32 and not bool(isolated.any())
    exact = torch.linalg.solve(assembled(links.double(), ground.double()), rhs.double())
    relative = ((x.double() - exact).abs() / exact.abs()).max()
    assert relative < 1e-4, f"componentwise relative error {float(relative):.3g}"


def test_float32_weak_ground_link_behind_a_strong_one():
    """Ground - a (1e-10) - b (1): the assembled matrix is [[1 + 1e-10, -1], [-1, 1]], singular in
    float32; the solution (1e10, 1e10) for rhs (1, 0) is kept to float32 precision."""
    links = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float32)
    ground = torch.tensor([[1e-10, 0.0]], dtype=torch.float32)
    x, isolated = grounded_laplacian_solve(links, ground, torch.tensor([[1.0, 0.0]]))
    expected = 1 / torch.tensor(1e-10, dtype=torch.float32).double()
    assert not bool(isolated.any())
    torch.testing.assert_close(x.double(), torch.full((1, 2), float(expected), dtype=torch.float64), rtol=1e-6, atol=0)


def two_systems(cut_component: bool):
    """System 0: nodes 0-1 reach ground, node 2 has no link at all, and (``cut_component``) nodes 3-4
    link only to each other; system 1: a connected chain to ground."""
    links = torch.zeros(2, 5, 5, dtype=torch.float64)
    links[0, 0, 1] = links[0, 1, 0] = 2.0
    ground = torch.zeros(2, 5, dtype=torch.float64)
    ground[0, 1] = 1.0
    if cut_component:
        links[0, 3, 4] = links[0, 4, 3] = 0.5
    else:
        ground[0, 3:] = 1.5
    for i in range(4):
        links[1, i, i + 1] = links[1, i + 1, i] = 1.0 + i
    ground[1, 4] = 3.0
    rhs = torch.arange(1.0, 11.0, dtype=torch.float64).view(2, 5)
    return links, ground, rhs


def test_an_isolated_node_gets_zero_and_is_flagged():
    links, ground, rhs = two_systems(cut_component=False)
    x, isolated = grounded_laplacian_solve(links, ground, rhs)
    assert isolated.tolist() == [True, False]
    assert x[0, 2].item() == 0.0
    keep = [0, 1, 3, 4]
    part = assembled(links[:1][:, keep][:, :, keep], ground[:1, keep])
    torch.testing.assert_close(x[0, keep], torch.linalg.solve(part, rhs[:1, keep])[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        x[1], torch.linalg.solve(assembled(links[1:], ground[1:]), rhs[1:])[0], rtol=1e-12, atol=0
    )


def test_a_component_without_ground_is_grounded_at_its_last_node_and_flagged():
    """Nodes 3 and 4 are linked to each other but have no path to ground: the group is grounded at
    its last node (x_4 = 0), so node 3 solves its own equation relative to it (the docstring's
    promise: only differences within the group are determined), and the rest of the system is solved."""
    links, ground, rhs = two_systems(cut_component=True)
    x, isolated = grounded_laplacian_solve(links, ground, rhs)
    assert isolated.tolist() == [True, False]
    assert bool(torch.isfinite(x).all())
    part = assembled(links[:1, :2, :2], ground[:1, :2])
    torch.testing.assert_close(x[0, :2], torch.linalg.solve(part, rhs[:1, :2])[0], rtol=1e-12, atol=0)
    assert x[0, 2].item() == 0.0 and x[0, 4].item() == 0.0
    assert x[0, 3].item() == pytest.approx(rhs[0, 3].item() / links[0, 3, 4].item(), rel=1e-12)


def test_empty_systems():
    x, isolated = grounded_laplacian_solve(torch.zeros(3, 0, 0), torch.zeros(3, 0), torch.zeros(3, 0))
    assert x.shape == (3, 0) and isolated.tolist() == [False, False, False]
    x, isolated = grounded_laplacian_solve(torch.zeros(0, 4, 4), torch.zeros(0, 4), torch.zeros(0, 4, 2))
    assert x.shape == (0, 4, 2) and isolated.shape == (0,)
    x, isolated = grounded_laplacian_solve(torch.zeros(1, 1, 1), torch.tensor([[4.0]]), torch.tensor([[2.0]]))
    assert x.tolist() == [[0.5]] and isolated.tolist() == [False]


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_flows_form_solves_the_summed_right_hand_side(n):
    links, ground = random_system(6, n, 50 + n)
    gen = torch.Generator().manual_seed(n)
    upper = torch.triu(torch.randn(6, n, n, generator=gen, dtype=torch.float64), 1)
    flows, to_ground = upper - upper.transpose(1, 2), torch.randn(6, n, generator=gen, dtype=torch.float64)
    x, isolated = grounded_laplacian_solve_flows(links, ground, flows, to_ground)
    expected, _ = grounded_laplacian_solve(links, ground, flows.sum(dim=2) + to_ground)
    assert not bool(isolated.any())
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-12)


def test_flows_form_keeps_a_weak_cut_that_the_summed_form_loses():
    """Two blocks of strongly linked nodes (links 1) joined by a link of 1e-28, internal flows of
    1e-10 that cancel within each block, and 1e-28 crossing between them: the blocks' relative
    step is 1 (one leaving flow over the weak link). Summed per node first, the internal flows'
    rounding (1e-26) swamps the crossing one; carried as flows, it stays exact."""
    n = 4  # nodes 0, 1 (block A) and 2, 3 (block B); node 3 grounded through a strong link
    links = torch.zeros(1, n, n, dtype=torch.float64)
    for i, j, w in [(0, 1, 1.0), (2, 3, 1.0), (1, 2, 1e-28)]:
        links[0, i, j] = links[0, j, i] = w
    ground = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    flows = torch.zeros(1, n, n, dtype=torch.float64)
    for i, j, f in [(0, 1, 3.3e-10), (2, 3, -7.1e-10), (1, 2, 1e-28)]:
        flows[0, i, j], flows[0, j, i] = f, -f
    to_ground = torch.zeros(1, n, dtype=torch.float64)
    x, _ = grounded_laplacian_solve_flows(links, ground, flows, to_ground)
    exact = torch.linalg.solve(assembled(links, ground), flows.sum(dim=2) + to_ground)  # (only the split matters)
    split = float(x[0, :2].mean() - x[0, 2:].mean())
    assert abs(split - 1.0) < 1e-6, split
    assert abs(float(exact[0, :2].mean() - exact[0, 2:].mean()) - 1.0) > 1e-3  # the summed form loses it
