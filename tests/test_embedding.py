"""The bucketed row-level layer equals plain per-row embeddings with the same weights (DESIGN.md decision 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from sharding.embedding import PlannedEmbedding, RowRemap
from sharding.plan import DimensionPlan, FeaturePlan


def _plan(projection: str) -> DimensionPlan:
    rng = np.random.default_rng(0)
    return DimensionPlan(
        (
            FeaturePlan("user", 40, 6, dim=6),
            FeaturePlan("item", 60, 16, row_dims=rng.choice([2, 5, 8, 16], size=60), projection=projection),  # type: ignore[arg-type]
        )
    )


def _kjt(batch: int = 7) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(1)
    user_len = torch.ones(batch, dtype=torch.int64)
    item_len = torch.randint(0, 5, (batch,), generator=g)
    return KeyedJaggedTensor(
        keys=["user", "item"],
        values=torch.cat(
            [
                torch.randint(0, 40, (batch,), generator=g),
                torch.randint(0, 60, (int(item_len.sum()),), generator=g),
            ]
        ),
        lengths=torch.cat([user_len, item_len]),
        stride=batch,
    )


def _per_row_reference(plan: DimensionPlan, layer: PlannedEmbedding, feature: str) -> torch.Tensor:
    """Row r's embedding as the model sees it, built one row at a time from the tables' weights."""
    f = plan[feature]
    bucket, local = f.remap
    tables = f.tables()
    weights = {name: bag.weight.detach() for name, bag in layer.ebc.embedding_bags.items()}
    rows = []
    for r in range(f.num_embeddings):
        t = tables[int(bucket[r])]
        assert t.logical_dim == (f.row_dims[r] if f.row_dims is not None else f.dim)
        x = weights[t.name][int(local[r]), : t.logical_dim]
        if f.row_level:
            x = (
                layer.projections[t.name](x)
                if f.projection == "linear"
                else F.pad(x, (0, f.output_dim - t.logical_dim))
            )
        rows.append(x)
    return torch.stack(rows).detach()


@pytest.mark.parametrize("projection", ["pad", "linear"])
def test_bucketed_layer_equals_per_row_reference(projection: str) -> None:
    torch.manual_seed(0)
    plan = _plan(projection)
    layer = PlannedEmbedding(plan)
    kjt = _kjt()
    out = layer(RowRemap(plan)(kjt))
    assert list(out) == ["user", "item"] and out["user"].shape == (7, 6) and out["item"].shape == (7, 16)
    per_key = kjt.to_dict()
    for feature in ("user", "item"):
        ref_rows = _per_row_reference(plan, layer, feature)
        jt = per_key[feature]
        expected = torch.stack([ref_rows[v].sum(0) for v in torch.split(jt.values(), jt.lengths().tolist())])
        torch.testing.assert_close(out[feature].detach(), expected)


def test_tables_and_parameters_follow_the_plan() -> None:
    plan = _plan("linear")
    names = [t.name for t in plan.tables()]
    assert names == ["t_user", "t_item__d2", "t_item__d5", "t_item__d8", "t_item__d16"]
    layer = PlannedEmbedding(plan)
    ebc_params = sum(p.numel() for p in layer.ebc.parameters())
    proj_params = sum(p.numel() for p in layer.projections.parameters())
    assert ebc_params + proj_params == plan.parameters
    assert {n: b.weight.shape[1] for n, b in layer.ebc.embedding_bags.items()} == {
        "t_user": 8,
        "t_item__d2": 4,
        "t_item__d5": 8,
        "t_item__d8": 8,
        "t_item__d16": 16,
    }
