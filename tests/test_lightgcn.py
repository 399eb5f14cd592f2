"""LightGCN against a dense, plainly written reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.lightgcn import LightGCN, lightgcn_bpr_loss, normalized_adjacency


def _dense_reference(users: np.ndarray, items: np.ndarray, nu: int, ni: int) -> torch.Tensor:
    a = torch.zeros(nu + ni, nu + ni, dtype=torch.float64)
    for u, i in zip(users.tolist(), items.tolist(), strict=True):
        a[u, nu + i] = a[nu + i, u] = 1.0
    d = a.sum(1)
    inv = torch.where(d > 0, d.clamp_min(1).rsqrt(), torch.zeros_like(d))
    return inv[:, None] * a * inv[None, :]


def test_propagation_equals_the_dense_reference() -> None:
    rng = np.random.default_rng(0)
    nu, ni = 7, 9
    users, items = rng.integers(0, nu, 40), rng.integers(0, ni, 40)
    adj = normalized_adjacency(users, items, nu, ni)
    ref = _dense_reference(users, items, nu, ni)
    torch.testing.assert_close(adj.to_dense().double(), ref, rtol=1e-6, atol=1e-6)
    eu, ei = torch.randn(nu, 5), torch.randn(ni, 5)
    fu, fi = LightGCN(adj, nu, layers=3)(eu, ei)
    x = torch.cat([eu, ei]).double()
    layers = [x]
    for _ in range(3):
        layers.append(ref @ layers[-1])
    final = torch.stack(layers).mean(0).float()
    torch.testing.assert_close(torch.cat([fu, fi]), final, rtol=1e-5, atol=1e-5)


def test_gradients_flow_and_bpr_learns_the_observed_items() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    nu, ni = 30, 40
    users = np.repeat(np.arange(nu), 4)
    items = (users * 3 + rng.integers(0, 4, users.size)) % ni  # each user likes a small neighbourhood
    model = LightGCN(normalized_adjacency(users, items, nu, ni), nu)
    eu = torch.nn.Parameter(torch.randn(nu, 8) * 0.1)
    ei = torch.nn.Parameter(torch.randn(ni, 8) * 0.1)
    opt = torch.optim.Adam([eu, ei], lr=0.05)
    u_t, p_t = torch.from_numpy(users), torch.from_numpy(items)
    for _ in range(200):
        neg = torch.randint(0, ni, (users.size,))
        fu, fi = model(eu, ei)
        loss = lightgcn_bpr_loss(fu, fi, eu, ei, u_t, p_t, neg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fu, fi = model(eu, ei)
    scores = LightGCN.scores(fu, fi).detach()
    top = scores.topk(8, dim=1).indices
    hits = np.mean([len(set(top[u].tolist()) & set(items[users == u].tolist())) > 0 for u in range(nu)])
    assert hits > 0.9
    assert loss.item() < 0.3


def test_bad_graph_input() -> None:
    with pytest.raises(ValueError, match="out of range"):
        normalized_adjacency(np.array([0, 5]), np.array([0, 1]), 3, 3)
