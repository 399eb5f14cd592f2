"""AutoDim's parts: Gumbel-softmax weights, the alignment head against a sliced reference, the schedule, the hard
selection and its budget rule, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from search.autodim import (
    AutoDimConfig,
    AutoDimHead,
    AutoDimSearcher,
    UniformBudgetSearcher,
    gumbel_softmax_weights,
)
from sharding.plan import Budget, PlanError

ROWS = {"a": 100, "b": 1000, "c": 50}


def test_gumbel_softmax_weights_sum_to_one_and_sharpen_as_temperature_falls() -> None:
    logits = torch.tensor([[0.5, 0.2, -0.1, 0.0, 0.3]] * 4000)
    entropies = []
    for tau in (1.0, 0.3, 0.05):
        p = gumbel_softmax_weights(logits, tau, torch.Generator().manual_seed(0))
        torch.testing.assert_close(p.sum(-1), torch.ones(4000))
        assert (p >= 0).all()
        entropies.append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()))
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[2] < 0.1  # nearly one-hot at a low temperature
    # The argmax frequencies follow softmax(logits) (the Gumbel-max trick).
    p = gumbel_softmax_weights(logits, 0.05, torch.Generator().manual_seed(1))
    freq = torch.bincount(p.argmax(-1), minlength=5).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)


def test_temperature_schedule_and_alternation() -> None:
    cfg = AutoDimConfig(temperature_decay=5e-5, arch_every=10, warmup_steps=20)
    assert cfg.temperature(0) == 1.0
    assert cfg.temperature(10_000) == pytest.approx(0.5)
    assert cfg.temperature(10**6) == 0.01
    after = [s for s in range(60) if cfg.arch_step_after(s)]
    assert after == [29, 39, 49, 59]  # none during warm-up, then one per 10 model steps


def test_head_equals_a_per_candidate_sliced_reference() -> None:
    torch.manual_seed(0)
    cfg = AutoDimConfig(candidate_dims=(4, 8, 16))
    head = AutoDimHead(["a", "b"], cfg)
    with torch.no_grad():
        head.arch_logits.copy_(torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, -1.0]]))
    pooled = {"a": torch.randn(32, 16), "b": torch.randn(32, 16)}
    head.train()
    head.step.fill_(7)
    out = head(pooled)
    weights = head.weights()  # same step → same Gumbel draw
    # Reference: explicit slicing and one linear map per (field, candidate), then BN over the batch.
    for m, f in enumerate(["a", "b"]):
        expected = torch.zeros(32, 16)
        for n, d in enumerate(cfg.candidate_dims):
            lin = pooled[f][:, :d] @ head.align_weight[m, n, :d] + head.align_bias[m, n]
            normed = (lin - lin.mean(0)) / torch.sqrt(lin.var(0, unbiased=False) + 1e-5)
            expected += weights[m, n] * normed
        torch.testing.assert_close(out[f], expected, atol=1e-4, rtol=1e-4)
    # Evaluation mixes with softmax(α), no noise.
    head.eval()
    torch.testing.assert_close(head.weights(), torch.softmax(head.arch_logits, -1))


def test_gradients_reach_the_architecture_logits() -> None:
    head = AutoDimHead(["a"], AutoDimConfig(candidate_dims=(4, 8)))
    out = head({"a": torch.randn(16, 8)})["a"]
    (out * torch.randn_like(out)).sum().backward()
    assert head.arch_logits.grad is not None and head.arch_logits.grad.abs().sum() > 0


def test_derived_dims_are_the_argmax() -> None:
    searcher = AutoDimSearcher(AutoDimConfig(candidate_dims=(4, 8, 16, 24, 32)))
    searcher.initial_plan(list(ROWS), ROWS)
    probs = np.array([[0.1, 0.6, 0.1, 0.1, 0.1], [0.0, 0.0, 0.1, 0.2, 0.7], [0.5, 0.2, 0.1, 0.1, 0.1]])
    plan = searcher.derive(probs, ROWS)
    assert {f.feature: f.dim for f in plan.features} == {"a": 8, "b": 32, "c": 4}
    assert plan.provenance["method"] == "autodim"


def test_budget_shrinks_the_least_certain_fields_first() -> None:
    probs = np.array([[0.1, 0.1, 0.1, 0.1, 0.6], [0.0, 0.0, 0.0, 0.1, 0.9], [0.2, 0.2, 0.2, 0.1, 0.3]])
    unconstrained = 32 * (100 + 1000 + 50)
    budget = Budget(unconstrained - 32 * 50 + 24 * 50 - 1)  # one step on c is not quite enough
    searcher = AutoDimSearcher(AutoDimConfig(), budget)
    searcher.initial_plan(list(ROWS), ROWS)
    plan = searcher.derive(probs, ROWS)
    dims = {f.feature: f.dim for f in plan.features}
    # c is least certain (0.3) and shrinks first, to 24 then 16 → fits; a and b keep their argmax.
    assert dims == {"a": 32, "b": 32, "c": 16}
    assert plan.parameters <= budget.value


def test_bad_candidates_and_infeasible_budget() -> None:
    with pytest.raises(ValueError, match="candidate_dims is empty"):
        AutoDimConfig(candidate_dims=())
    with pytest.raises(ValueError, match=r"must be positive, got \[-4\]"):
        AutoDimConfig(candidate_dims=(-4, 8))
    with pytest.raises(ValueError, match=r"not multiples of 4.*e\.g\. \[8\]"):
        AutoDimConfig(candidate_dims=(4, 6))
    with pytest.raises(ValueError, match="strictly increasing"):
        AutoDimConfig(candidate_dims=(16, 8))
    searcher = AutoDimSearcher(AutoDimConfig(candidate_dims=(4, 8)), Budget(1000))
    with pytest.raises(PlanError, match=r"smallest feasible budget is 4,600"):
        searcher.initial_plan(list(ROWS), ROWS)


def test_uniform_budget_is_the_largest_equal_dim_that_fits() -> None:
    rows = sum(ROWS.values())
    plan = UniformBudgetSearcher(Budget(rows * 13)).initial_plan(list(ROWS), ROWS)
    assert {f.dim for f in plan.features} == {12} and plan.parameters <= rows * 13
    with pytest.raises(PlanError, match="smallest feasible budget is 4,600"):
        UniformBudgetSearcher(Budget(100)).initial_plan(list(ROWS), ROWS)


def test_searched_plan_feeds_a_model_with_per_field_projections() -> None:
    from models.factory import build_model

    searcher = AutoDimSearcher(AutoDimConfig(candidate_dims=(4, 8, 16)))
    searcher.initial_plan(list(ROWS), ROWS)
    plan = searcher.derive(np.eye(3), ROWS)
    dims = {f.feature: f.output_dim for f in plan.features}
    assert dims == {"a": 4, "b": 8, "c": 16}
    model = build_model("dlrm", dims, 2, "binary")
    out = model({f: torch.randn(5, d) for f, d in dims.items()}, torch.randn(5, 2))
    assert out.shape == (5,) and isinstance(model, nn.Module)


def test_bilevel_search_finds_the_dims_a_planted_target_needs() -> None:
    """Field `wide` carries a signal spread over 16 dims, field `narrow` over 4 and field `noise` none: alternating
    model / architecture steps (f = 2 here) put most of α on a candidate that holds the signal, for each field."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = AutoDimConfig(candidate_dims=(4, 8, 16, 32), arch_every=2, temperature_decay=1e-3)
    head = AutoDimHead(["wide", "narrow", "noise"], cfg)
    w_wide, w_narrow = torch.randn(16, generator=gen), torch.randn(4, generator=gen)

    def batch(n: int = 256) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x = {f: torch.randn(n, 32, generator=gen) for f in ("wide", "narrow", "noise")}
        y = x["wide"][:, :16] @ w_wide / 4 + x["narrow"][:, :4] @ w_narrow / 2
        return x, y

    top = nn.Linear(3 * 32, 1)
    model_opt = torch.optim.Adam([*top.parameters(), head.align_weight, head.align_bias], lr=3e-3)
    arch_opt = torch.optim.Adam([head.arch_logits], lr=0.03)
    for _ in range(1500):
        x, y = batch()
        out = head(x)
        loss = ((top(torch.cat([out[f] for f in head.features], 1)).squeeze(1) - y) ** 2).mean()
        model_opt.zero_grad()
        loss.backward()
        model_opt.step()
        if cfg.arch_step_after(head.advance()):
            xv, yv = batch()
            out = head(xv)
            val = ((top(torch.cat([out[f] for f in head.features], 1)).squeeze(1) - yv) ** 2).mean()
            arch_opt.zero_grad()
            val.backward()
            arch_opt.step()
    probs = head.probabilities()
    # wide needs >= 16 dims: almost no mass on 4 or 8; narrow is served by any candidate.
    assert probs[0, 2:].sum() > 0.9, probs
    assert probs[0].argmax() >= 2
    assert probs[2].argmax() == 0  # the noise field: larger candidates only add noise
