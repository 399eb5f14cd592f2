"""The embedding layer a `DimensionPlan` describes, as one TorchRec `EmbeddingBagCollection` (DESIGN.md 5, 6, 9).

- Field-level feature `f` with dim `d`: table `t_f` of `ceil4(d)` columns; the layer returns the first `d` columns of
  its pooled vector (the tail columns exist only because FBGEMM needs widths divisible by 4, and are never read,
  so they get no gradient: the same as a mask).
- Row-level feature `f`: one table per dim bucket, `t_f__d<dim>`, reading the KJT key `f__d<dim>`. `RowRemap`
  rewrites the batch's KJT (row → bucket key, local row) when the batch is built; the layer pools each bucket,
  keeps its logical columns, projects them to `f`'s output dim (zero padding or a learned linear map) and sums the
  buckets. Because sum pooling is linear this equals pooling each row's own (projected) embedding.

The output is a dict keyed by feature in the plan's order — never the sharded EBC's key order, which changes with
the sharding plan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from sharding.plan import DimensionPlan, physical_dim

QUANT_BITS = {"int8": 8, "int4": 4, "int2": 2}


def quantize_dequantize(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Rows of `x` (`[n, d]`, float) as serving stores and reads them in `dtype`: fp32 unchanged, fp16 rounded,
    int8/int4/int2 quantised row-wise with an fp16 scale and bias by FBGEMM's own op (the one TorchRec's inference
    quantisation calls) and read back by its inverse, the row zero-padded to its stored width (`physical_dim`) as
    the bundle's served tables are. A row served in `dtype` looks up exactly this."""
    if dtype == "fp32":
        return x
    if dtype == "fp16":
        return x.half().float()
    bits, width = QUANT_BITS[dtype], x.shape[1]
    padded = F.pad(x.float(), (0, physical_dim(width) - width)).contiguous()
    packed = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(padded, bits)
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(packed, bits)[:, :width]


def table_configs(plan: DimensionPlan) -> list[EmbeddingBagConfig]:
    """One `EmbeddingBagConfig` per table of the plan (field tables and row-level buckets), sum pooling."""
    return [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=t.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=[t.key],
            pooling=PoolingType.SUM,
        )
        for t in plan.tables()
    ]


class PlannedEmbedding(nn.Module):
    """Pooled embeddings of every feature, sized by a `DimensionPlan`.

    Args:
        plan: the dimension plan.
        device: where to build the tables; `meta` to plan sharding without allocating.
    """

    def __init__(self, plan: DimensionPlan, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.ebc = EmbeddingBagCollection(tables=table_configs(plan), device=torch.device(device or "cpu"))
        projections: dict[str, nn.Module] = {}
        for f in plan.features:
            if f.row_level and f.projection == "linear":
                for t in f.tables():
                    projections[t.name] = nn.Linear(t.logical_dim, f.output_dim, bias=False, device=device)
        self.projections = nn.ModuleDict(projections)
        self._layout = [(f.feature, f.output_dim, f.row_level, f.projection, f.tables()) for f in plan.features]

    @property
    def feature_dims(self) -> dict[str, int]:
        """The width the model sees per feature, in plan order."""
        return {f.feature: f.output_dim for f in self.plan.features}

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        pooled = self.ebc(kjt).to_dict()
        out: dict[str, torch.Tensor] = {}
        for feature, output_dim, row_level, projection, tables in self._layout:
            total: torch.Tensor | None = None
            for t in tables:
                x = pooled[t.key][:, : t.logical_dim]
                if row_level:
                    x = (
                        self.projections[t.name](x)
                        if projection == "linear"
                        else F.pad(x, (0, output_dim - t.logical_dim))
                    )
                total = x if total is None else total + x
            assert total is not None
            out[feature] = total
        return out


class RowRemap:
    """Rewrites a KJT of vocabulary rows into the plan's table keys: row-level features become one key per dim
    bucket (`f__d<dim>`) holding local rows; field-level features pass through. Vectorised (torch).

    Args:
        plan: the dimension plan whose row-level features are remapped.
    """

    def __init__(self, plan: DimensionPlan) -> None:
        self.plan = plan
        self.keys = [t.key for t in plan.tables()]
        self._maps: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
        for f in plan.features:
            if f.row_level:
                bucket, local = f.remap
                self._maps[f.feature] = (
                    torch.from_numpy(bucket),
                    torch.from_numpy(local),
                    [t.key for t in f.tables()],
                )

    @property
    def identity(self) -> bool:
        return not self._maps

    def __call__(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if self.identity:
            return kjt
        per_key = kjt.to_dict()
        batch = kjt.stride()
        values: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        for f in self.plan.features:
            jt = per_key[f.feature]
            if f.feature not in self._maps:
                values.append(jt.values())
                lengths.append(jt.lengths())
                continue
            bucket_of, local_of, keys = self._maps[f.feature]
            rows = jt.values()
            bucket, local = bucket_of[rows], local_of[rows]
            sample = torch.repeat_interleave(torch.arange(batch), jt.lengths())
            for b in range(len(keys)):
                mask = bucket == b
                values.append(local[mask])
                lengths.append(torch.bincount(sample[mask], minlength=batch).to(jt.lengths().dtype))
        return KeyedJaggedTensor(keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=batch)
