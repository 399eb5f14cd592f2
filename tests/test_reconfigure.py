"""Live reconfiguration (`sharding.live`): unchanged tables move shard-locally with their fused optimizer state bit
for bit, changed tables follow `migrate_weights`' row rule (checked against it on whole tensors), migrated rows
carry their row-wise Adagrad accumulator, and training goes on; on 2 gloo ranks, in one spawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec import KeyedJaggedTensor

from sharding.checkpoint import full_tensors, migrate_weights, read_tensors, save_checkpoint, tensor_metadata
from sharding.distributed import (
    ShardingConfig,
    attach_fused_optimizer,
    combined_optimizer,
    plan_sharding,
    shard_model,
)
from sharding.embedding import PlannedEmbedding, RowRemap
from sharding.live import Reconfiguration, ReconfigurationError, reconfigure_live
from sharding.plan import DimensionPlan, FeaturePlan
from tests.multiprocess import run_ranks

ROWS = {"user": 40, "item": 60, "f0": 12}
PREFIX = "embedding.ebc.embedding_bags."


class _Model(nn.Module):
    """Embeddings, a tower over `user` alone (its shape never changes) and one over the rest (it does)."""

    def __init__(self, plan: DimensionPlan, device: str) -> None:
        super().__init__()
        self.embedding = PlannedEmbedding(plan, device)
        dims = self.embedding.feature_dims
        self.user_tower = nn.Linear(dims["user"], 1, device=device)
        self.rest = nn.Linear(dims["item"] + dims["f0"], 1, device=device)

    def forward(self, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        e = self.embedding(kjt)
        logits = self.user_tower(e["user"]).squeeze(1) + self.rest(torch.cat([e["item"], e["f0"]], 1)).squeeze(1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels), e


def _old_plan() -> DimensionPlan:
    item = np.random.default_rng(0).choice([4, 8, 12], ROWS["item"])
    return DimensionPlan(
        (
            FeaturePlan("user", ROWS["user"], 16, dim=16),
            FeaturePlan("item", ROWS["item"], 16, row_dims=item),
            FeaturePlan("f0", ROWS["f0"], 4, dim=4),
        )
    )


def _new_plan(old: DimensionPlan) -> DimensionPlan:
    """`user` untouched; `item`: rows swap 4 <-> 8 among the first 20, and every 4 past row 40 grows to 16 (a new
    bucket), the 12s stay (an unchanged bucket); `f0` grows 4 -> 8."""
    item = np.asarray(old["item"].row_dims).copy()
    first = item[:20]
    item[:20] = np.where(first == 4, 8, np.where(first == 8, 4, first))
    item[40:][item[40:] == 4] = 16
    return DimensionPlan(
        (
            FeaturePlan("user", ROWS["user"], 16, dim=16),
            FeaturePlan("item", ROWS["item"], 16, row_dims=item),
            FeaturePlan("f0", ROWS["f0"], 8, dim=8),
        )
    )


def _build(plan: DimensionPlan, cfg: ShardingConfig, seed: int):  # type: ignore[no-untyped-def]
    meta = _Model(plan, "meta")
    attach_fused_optimizer(meta, cfg)
    sharding_plan, _ = plan_sharding(meta, cfg, world_size=dist.get_world_size(), pg=dist.group.WORLD)
    torch.manual_seed(seed)
    dmp = shard_model(meta, sharding_plan, dist.group.WORLD, torch.device("cpu"))
    return dmp, combined_optimizer(dmp, dense_lr=0.1)


def _batch(seed: int, batch: int = 16) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [torch.randint(1, 3, (batch,), generator=g) for _ in ROWS]
    values = [torch.randint(0, ROWS[f], (int(n.sum()),), generator=g) for f, n in zip(ROWS, lengths, strict=True)]
    kjt = KeyedJaggedTensor(keys=list(ROWS), values=torch.cat(values), lengths=torch.cat(lengths), stride=batch)
    return kjt, torch.randint(0, 2, (batch,), generator=g).float()


def _single_rows() -> KeyedJaggedTensor:
    """One bag per item row (user and f0 read row 0), to compare rows one by one."""
    n = ROWS["item"]
    zeros = torch.zeros(n, dtype=torch.int64)
    return KeyedJaggedTensor(
        keys=list(ROWS),
        values=torch.cat([zeros, torch.arange(n), zeros]),
        lengths=torch.ones(3 * n, dtype=torch.int64),
        stride=n,
    )


def _step(dmp: nn.Module, optimizer: torch.optim.Optimizer, plan: DimensionPlan, seed: int) -> float:
    kjt, labels = _batch(seed)
    loss, _ = dmp(RowRemap(plan)(kjt), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss)


def _outputs(dmp: nn.Module, plan: DimensionPlan, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        _, pooled = dmp(RowRemap(plan)(kjt), torch.zeros(kjt.stride()))
    return {k: v.detach().clone() for k, v in pooled.items()}


def _whole(directory: Path, prefix: str) -> dict[str, torch.Tensor]:
    return read_tensors(directory, [k for k in tensor_metadata(directory) if k.startswith(prefix)])


def _momentum(table: str) -> str:
    return f"optim.state.{PREFIX}{table}.weight.{table}.momentum1"


def _carried_momentum(old: DimensionPlan, new: DimensionPlan, feature: str, old_state: dict, fresh: dict) -> dict:
    """The slow, plainly correct rule: each new row takes its old row's accumulator (a row loop, on purpose)."""
    of, nf = old[feature], new[feature]
    out = {}
    for b, t in enumerate(nf.tables()):
        expected = fresh[_momentum(t.name)].clone()
        for local, row in enumerate(np.flatnonzero(nf.remap[0] == b)):
            if row < of.num_embeddings:
                ob, ol = int(of.remap[0][row]), int(of.remap[1][row])
                expected[local] = old_state[_momentum(of.tables()[ob].name)][ol]
        out[t.name] = expected
    return out


def _run_live_reconfiguration(rank: int, world_size: int, tmp: str) -> None:
    root = Path(tmp)
    cfg = ShardingConfig(sharding_types=("table_wise",))
    assert cfg.optimizer == "rowwise_adagrad"  # the project's default fused optimizer is what is tested
    old_plan, world = _old_plan(), dist.group.WORLD
    new_plan = _new_plan(old_plan)
    dmp, optimizer = _build(old_plan, cfg, seed=rank)
    for step in range(3):
        _step(dmp, optimizer, old_plan, seed=100 * rank + step)
    probe = _batch(seed=7)[0]
    before, before_rows = _outputs(dmp, old_plan, probe), _outputs(dmp, old_plan, _single_rows())

    new_dmp, new_optimizer = _build(new_plan, cfg, seed=10 + rank)
    fresh_dir = save_checkpoint(
        root / "fresh", {"model": new_dmp.state_dict(), "optim": new_optimizer.state_dict()}, pg=world
    )
    report = reconfigure_live(dmp, optimizer, old_plan, new_dmp, new_optimizer, new_plan, root / "scratch", pg=world)
    assert report.kept_tables == ("t_user", "t_item__d12")
    assert set(report.migrated_tables) == {"t_item__d4", "t_item__d8", "t_item__d16", "t_f0"}
    assert "user_tower.weight" in report.kept_dense and "rest.weight" in report.fresh_dense
    # Only the changed tables' sources are read whole, never a kept one.
    assert not {"t_user", "t_item__d12"} & set(report.tables_read)

    # (a) the unchanged feature's pooled output, (b) every item row whose dim did not change: bit for bit.
    after, after_rows = _outputs(new_dmp, new_plan, probe), _outputs(new_dmp, new_plan, _single_rows())
    assert torch.equal(after["user"], before["user"])
    same = torch.from_numpy(np.asarray(old_plan["item"].row_dims) == np.asarray(new_plan["item"].row_dims))
    assert 0 < int(same.sum()) < ROWS["item"]
    assert torch.equal(after_rows["item"][same], before_rows["item"][same])

    # (d) the whole new model equals migrate_weights on whole tensors (fresh values from the new model itself).
    after_dir = save_checkpoint(
        root / "after", {"model": new_dmp.state_dict(), "optim": new_optimizer.state_dict()}, pg=world
    )
    expected = migrate_weights(old_plan, new_plan, full_tensors(root / "scratch"), full_tensors(fresh_dir))
    got = full_tensors(after_dir)
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    # (c) optimizer state: kept tables and the unchanged dense tower bit for bit; migrated rows carry theirs.
    old_opt, fresh_opt, got_opt = (_whole(d, "optim.") for d in (root / "scratch", fresh_dir, after_dir))
    assert sorted(got_opt) == sorted(fresh_opt)
    for table in ("t_user", "t_item__d12"):
        assert torch.equal(got_opt[_momentum(table)], old_opt[_momentum(table)]), table
        assert bool((old_opt[_momentum(table)] > 0).any())  # trained, so the check means something
    for state in ("sum", "step"):
        assert torch.equal(
            got_opt[f"optim.state.user_tower.weight.{state}"], old_opt[f"optim.state.user_tower.weight.{state}"]
        )
        assert torch.equal(got_opt[f"optim.state.rest.weight.{state}"], fresh_opt[f"optim.state.rest.weight.{state}"])
    carried = _carried_momentum(old_plan, new_plan, "item", old_opt, fresh_opt)
    carried["t_f0"] = old_opt[_momentum("t_f0")]  # same rows, wider: each row keeps its accumulator
    for table, want in carried.items():
        assert torch.equal(got_opt[_momentum(table)], want), table

    # (e) training goes on under the new plan.
    loss = _step(new_dmp, new_optimizer, new_plan, seed=200 + rank)
    assert np.isfinite(loss)

    # A placement change of the form of the state: the same plan, data-parallel (the row-wise accumulator as a
    # [rows, 1] `sum` and a scalar `step` of torchrec's RowWiseAdagrad, instead of the fused row-wise `momentum1`).
    # Weights stay bit for bit; each row keeps its accumulator.
    dp_dmp, dp_optimizer = _build(new_plan, ShardingConfig(sharding_types=("data_parallel",)), seed=20 + rank)
    move = Reconfiguration(new_plan, new_plan)
    assert move.changed_tables == []
    move.save(root / "scratch", new_dmp, new_optimizer, world)
    trained = full_tensors(root / "scratch")
    rowwise = _whole(root / "scratch", "optim.")
    dp_report = move.load(root / "scratch", dp_dmp, dp_optimizer, world)
    assert dp_report.tables_read  # the state changed form, so the tables' accumulators are read whole
    state = dp_optimizer.state_dict()["state"]
    for key, value in dp_dmp.state_dict().items():
        assert torch.equal(value, trained[key]), key
    for t in new_plan.tables():
        accumulator = state[f"{PREFIX}{t.name}.weight"]["sum"]
        row = rowwise[_momentum(t.name)]
        assert accumulator.shape == (t.num_embeddings, 1), t.name
        assert torch.equal(accumulator[:, 0], row), t.name
        assert bool((row > 0).any()), t.name  # trained, so the check means something
    assert np.isfinite(_step(dp_dmp, dp_optimizer, new_plan, seed=300 + rank))

    # Back to the old plan through a learned transform (ESAPN's): changed rows are what migrate_weights gives.
    def transform(x: torch.Tensor, d_old: int, d_new: int) -> torch.Tensor:
        return x @ torch.linspace(-1.0, 1.0, d_old * d_new).view(d_old, d_new)

    back_dmp, back_optimizer = _build(old_plan, cfg, seed=30 + rank)
    back_fresh = save_checkpoint(root / "fresh", {"model": back_dmp.state_dict()}, pg=world)
    reconfigure_live(
        new_dmp,
        new_optimizer,
        new_plan,
        back_dmp,
        back_optimizer,
        old_plan,
        root / "scratch",
        pg=world,
        transform=transform,
    )
    expected = migrate_weights(
        new_plan, old_plan, full_tensors(root / "scratch"), full_tensors(back_fresh), transform=transform
    )
    got = full_tensors(save_checkpoint(root / "after", {"model": back_dmp.state_dict()}, pg=world))
    for key in expected:  # close, not equal: a matmul over another subset of rows may round differently
        torch.testing.assert_close(got[key], expected[key], msg=key)


@pytest.mark.multirank
def test_live_reconfiguration_keeps_unchanged_tables_and_their_optimizer_state(tmp_path: Path) -> None:
    run_ranks(_run_live_reconfiguration, 2, str(tmp_path))


def test_moves_keep_only_tables_of_the_same_rows_and_dims() -> None:
    old = _old_plan()
    moves = Reconfiguration(old, _new_plan(old)).moves
    assert {t for t, m in moves.items() if m.kept} == {"t_user", "t_item__d12"}
    assert moves["t_f0"].reason == "shape 12x4 -> 12x8" and moves["t_f0"].sources == ("t_f0",)
    assert moves["t_item__d16"].reason == "new table" and moves["t_item__d16"].sources == ("t_item__d4",)
    # Same name and shape, other member rows: migrated, not kept (its local rows mean other rows now).
    dims = np.asarray(old["item"].row_dims).copy()
    four, eight = np.flatnonzero(dims == 4)[0], np.flatnonzero(dims == 8)[-1]
    dims[[four, eight]] = dims[[eight, four]]
    swapped = DimensionPlan((old["user"], FeaturePlan("item", ROWS["item"], 16, row_dims=dims), old["f0"]))
    moves = Reconfiguration(old, swapped).moves
    assert moves["t_item__d4"].reason == moves["t_item__d8"].reason == "member rows changed"
    assert moves["t_item__d12"].kept
    # A logical dim change inside the same stored width is a change too (the tail column must be zero-padded).
    wider = DimensionPlan.field_level({"user": 15}, ROWS)
    narrower = DimensionPlan.field_level({"user": 14}, ROWS)
    assert Reconfiguration(wider, narrower).moves["t_user"].reason == "dim 15 -> 14"
    assert Reconfiguration(wider, wider).moves["t_user"].kept
    new_feature = DimensionPlan.field_level({"user": 15, "f0": 4}, ROWS)
    assert Reconfiguration(wider, new_feature).moves["t_f0"].reason == "new feature"
    with pytest.raises(ReconfigurationError, match="same dtype"):
        Reconfiguration(wider, DimensionPlan(wider.features, dtype="fp16"))


_FREED_HEAP = """
import os, sys
import numpy as np
from sharding.live import _MALLOC_TRIM, release_free_memory
if _MALLOC_TRIM is None:
    print("no malloc_trim")
    sys.exit(0)
def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
blocks = [np.ones(8192) for _ in range(4000)]  # 64 KiB each, under glibc's mmap threshold: 250 MiB of heap
keep = blocks[-1]  # the heap's top stays in use, so free() alone cannot give the rest back
del blocks
before = rss()
release_free_memory()
print(before - rss())
"""


def test_release_free_memory_gives_the_heaps_free_pages_back() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FREED_HEAP], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    if out == ["no", "malloc_trim"]:
        pytest.skip("the C library has no malloc_trim (not glibc)")
    assert int(out[-1]) > 150 * 2**20  # of the ~250 MiB freed but still resident
