from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from sharding import plan as plan_module
from sharding.plan import (
    PLAN_FILE,
    PLAN_VERSION,
    Budget,
    DimensionPlan,
    FeaturePlan,
    PlanError,
    physical_dim,
    row_bytes,
    uniform_plan,
)

ROW_DIMS = np.array([3, 8, 3, 5, 8, 3])
RAW_IDS = np.array([-1, 10, 20, 30, 40, 50])


def _row_feature(projection: str = "pad", raw_ids: np.ndarray | None = RAW_IDS) -> FeaturePlan:
    return FeaturePlan("item", 6, 8, row_dims=ROW_DIMS.copy(), projection=projection, raw_ids=raw_ids)  # type: ignore[arg-type]


def _field_feature() -> FeaturePlan:
    return FeaturePlan("user", 10, 6, dim=6)


def _mixed_plan(**kw: Any) -> DimensionPlan:
    """`user`: 10 rows at dim 6 (stored 8) = 80; `item`: buckets 3/5/8 with 3/1/2 rows = 12 + 8 + 16 = 36."""
    return DimensionPlan((_field_feature(), _row_feature()), **kw)


def _reference_remap(row_dims: list[int]) -> tuple[list[int], list[int]]:
    """Plain-Python row → (bucket among the ascending distinct dims, running count within that bucket)."""
    dims = sorted(set(row_dims))
    seen = {d: 0 for d in dims}
    bucket, local = [], []
    for d in row_dims:
        bucket.append(dims.index(d))
        local.append(seen[d])
        seen[d] += 1
    return bucket, local


def _assert_plans_equal(a: DimensionPlan, b: DimensionPlan) -> None:
    assert a.feature_names == b.feature_names
    assert a.tables() == b.tables()
    assert a.dtype == b.dtype
    assert a.budget == b.budget
    assert dict(a.provenance) == dict(b.provenance)
    for fa, fb in zip(a.features, b.features, strict=True):
        assert (fa.num_embeddings, fa.output_dim, fa.dim, fa.projection) == (
            fb.num_embeddings,
            fb.output_dim,
            fb.dim,
            fb.projection,
        )
        for x, y in [(fa.row_dims, fb.row_dims), (fa.raw_ids, fb.raw_ids)]:
            if x is None:
                assert y is None
            else:
                np.testing.assert_array_equal(x, y)


def _edit_json(directory: Path, edit: Any, *, reseal: bool = False) -> None:
    """Apply `edit` to the saved plan.json; `reseal` recomputes the body checksum (well-formed, bad plan)."""
    path = directory / PLAN_FILE
    body = json.loads(path.read_text())
    edit(body)
    if reseal:
        checksums = body.pop("checksums")
        checksums["body"] = plan_module._sha256_json(body)
        body["checksums"] = checksums
    path.write_text(json.dumps(body))


# --- sizes and tables -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "stored"), [(1, 4), (3, 4), (4, 4), (5, 8), (8, 8), (9, 12), (16, 16), (17, 20), (63, 64)]
)
def test_physical_dim_rounds_up_to_multiple_of_4(dim: int, stored: int) -> None:
    assert physical_dim(dim) == stored


def test_field_level_feature_counts_physical_columns() -> None:
    f = _field_feature()
    assert f.tables() == [plan_module.TableSpec("t_user", "user", "user", 10, 6, 8)]
    assert f.parameters == 10 * 8
    assert f.logical_parameters == 10 * 6
    assert f.bucket_dims == [6]
    bucket, local = f.remap
    np.testing.assert_array_equal(bucket, np.zeros(10))
    np.testing.assert_array_equal(local, np.arange(10))


def test_row_level_tables_per_bucket_ascending() -> None:
    f = _row_feature()
    assert [(t.name, t.key, t.num_embeddings, t.logical_dim, t.embedding_dim) for t in f.tables()] == [
        ("t_item__d3", "item__d3", 3, 3, 4),
        ("t_item__d5", "item__d5", 1, 5, 8),
        ("t_item__d8", "item__d8", 2, 8, 8),
    ]
    assert f.bucket_dims == [3, 5, 8]
    assert f.parameters == 3 * 4 + 1 * 8 + 2 * 8
    assert f.projection_parameters == 0
    assert f.logical_parameters == int(ROW_DIMS.sum()) == 30


def test_linear_projection_parameters_are_counted() -> None:
    f = _row_feature("linear")
    # One (bucket dim → output_dim 8) map per bucket.
    assert f.projection_parameters == (3 + 5 + 8) * 8 == 128
    assert f.parameters == 36 + 128


def test_linear_projection_may_exceed_output_dim_but_pad_may_not() -> None:
    FeaturePlan("x", 2, 4, row_dims=np.array([4, 8]), projection="linear")
    with pytest.raises(PlanError, match=r"feature 'x': a row has dim 8 > output_dim 4; zero padding cannot shrink"):
        FeaturePlan("x", 2, 4, row_dims=np.array([4, 8]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_remap_matches_python_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    row_dims = rng.choice([2, 4, 7, 16, 33], size=500)
    f = FeaturePlan("f", 500, 64, row_dims=row_dims)
    ref_bucket, ref_local = _reference_remap(row_dims.tolist())
    bucket, local = f.remap
    np.testing.assert_array_equal(bucket, ref_bucket)
    np.testing.assert_array_equal(local, ref_local)
    # Local rows of each bucket are exactly 0..n_b-1 and the table row counts agree.
    for b, t in enumerate(f.tables()):
        np.testing.assert_array_equal(np.sort(local[bucket == b]), np.arange(t.num_embeddings))
        assert t.logical_dim == f.bucket_dims[b]
    assert sum(t.num_embeddings for t in f.tables()) == 500


def test_plan_parameters_and_bytes() -> None:
    p = _mixed_plan()
    assert [t.name for t in p.tables()] == ["t_user", "t_item__d3", "t_item__d5", "t_item__d8"]
    assert p.parameters == 80 + 36
    assert p.bytes == 116 * 4
    assert DimensionPlan(p.features, dtype="fp16").bytes == 116 * 2
    assert p["item"] is p.features[1]
    with pytest.raises(KeyError, match=r"no feature 'nope' in the plan \(have \['user', 'item'\]\)"):
        p["nope"]


def test_uniform_plan() -> None:
    p = uniform_plan(["a", "b", "c"], {"a": 5, "b": 7, "c": 9}, 10, budget=Budget(1000))
    assert p.feature_names == ["a", "b", "c"]
    assert [(t.name, t.num_embeddings, t.logical_dim, t.embedding_dim) for t in p.tables()] == [
        ("t_a", 5, 10, 12),
        ("t_b", 7, 10, 12),
        ("t_c", 9, 10, 12),
    ]
    assert p.parameters == (5 + 7 + 9) * 12
    assert p.budget == Budget(1000)
    with pytest.raises(PlanError, match=r"no num_embeddings for features \['c'\]"):
        uniform_plan(["a", "c"], {"a": 5}, 10)


# --- construction errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0, "output_dim": 0}, r"feature 'f': dim is 0; dims must be > 0"),
        ({"dim": -4, "output_dim": 4}, r"feature 'f': dim is -4; dims must be > 0"),
        ({"row_dims": np.array([4, 4, -1, 2])}, r"feature 'f': row 2 has dim -1; dims must be >= 0"),
        (  # dim 0 is a row not stored: it needs the shared table that serves it
            {"row_dims": np.array([4, 4, 0, 2])},
            r"feature 'f': 1 rows have dim 0 \(not stored\) but shared_rows is 0",
        ),
        ({"row_dims": np.array([4, 4, 4, 2]), "shared_rows": 2}, r"shared_rows is 2 but no row has dim 0"),
        ({"dim": 4, "shared_rows": 2}, r"row_dtypes and shared_rows need a row-level plan"),
        (
            {"row_dims": np.array([4, 4, 0, 2]), "shared_rows": 1, "row_dtypes": np.array([0, 9, 0, 0])},
            r"row_dtypes must hold one index into",
        ),
        ({"row_dims": np.array([4, 0]), "num_embeddings": 2, "shared_rows": 1, "shared_dim": 8}, r"a row has dim 8"),
        ({"row_dims": np.array([4, 4, 2])}, r"row_dims has shape \(3,\), expected \(4,\)"),
        (
            {"dim": 4, "row_dims": np.array([4, 4, 4, 4])},
            r"give exactly one of dim \(field-level\) or row_dims",
        ),
        ({}, r"give exactly one of dim"),
        ({"dim": 4, "output_dim": 8}, r"output_dim \(8\) must equal its dim \(4\)"),
        ({"dim": 4, "num_embeddings": 0}, r"num_embeddings is 0, expected >= 1"),
        ({"dim": 4, "raw_ids": np.array([1, 2])}, r"raw_ids must have one entry per row \(4\)"),
        ({"dim": 4, "projection": "zero"}, r"projection is 'zero', expected 'pad' or 'linear'"),
    ],
)
def test_feature_plan_rejects(kwargs: dict[str, Any], message: str) -> None:
    args = {"feature": "f", "num_embeddings": 4, "output_dim": 4, **kwargs}
    with pytest.raises(PlanError, match=message):
        FeaturePlan(**args)


def test_dimension_plan_rejects() -> None:
    with pytest.raises(PlanError, match="a plan needs at least one feature"):
        DimensionPlan(())
    with pytest.raises(PlanError, match=r"features repeat in the plan: \['user'\]"):
        DimensionPlan((_field_feature(), _field_feature()))
    with pytest.raises(PlanError, match=r"dtype is 'int8', expected one of \['fp16', 'fp32'\]"):
        DimensionPlan((_field_feature(),), dtype="int8")
    with pytest.raises(PlanError, match="budget is 0 parameters; it must be positive"):
        Budget(0)
    with pytest.raises(PlanError, match="budget unit is 'rows'"):
        Budget(10, "rows")  # type: ignore[arg-type]


# --- budget ---------------------------------------------------------------------------------------


def test_check_budget_parameters_and_bytes() -> None:
    _mixed_plan(budget=Budget(116)).check_budget()  # exactly at the budget is fine
    _mixed_plan(budget=Budget(116 * 4, "bytes")).check_budget()
    _mixed_plan().check_budget()  # no budget
    with pytest.raises(
        PlanError,
        match=r"the plan needs 116 parameters but the budget is 115 "
        r"\(parameters per feature: user=80, item=36\)\. Possible solutions: raise the budget",
    ):
        _mixed_plan(budget=Budget(115)).check_budget()
    with pytest.raises(PlanError, match=r"the plan needs 464 bytes but the budget is 463 \(parameters per feature"):
        _mixed_plan(budget=Budget(463, "bytes")).check_budget()


# --- save / load ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: uniform_plan(["a", "b"], {"a": 5, "b": 9}, 6), id="field-level"),
        pytest.param(lambda: DimensionPlan((_row_feature("linear"),)), id="row-level-raw-ids"),
        pytest.param(lambda: DimensionPlan((_row_feature(raw_ids=None),)), id="row-level-no-raw-ids"),
        pytest.param(
            lambda: _mixed_plan(
                budget=Budget(10_000, "bytes"),
                dtype="fp16",
                provenance={
                    "method": "autodim",
                    "days": [1, 2],
                    "config": {"search": {"dim": 16}},
                    "auc": 0.75,
                },
            ),
            id="mixed-budget-provenance",
        ),
    ],
)
def test_save_load_round_trip(tmp_path: Path, make: Any) -> None:
    plan = make()
    out = plan.save(tmp_path / "plan")
    assert out == tmp_path / "plan"
    expected = {PLAN_FILE} | {f"rows/{f.feature}.parquet" for f in plan.features if f.row_level}
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == expected
    loaded = DimensionPlan.load(out)
    _assert_plans_equal(plan, loaded)
    assert loaded.parameters == plan.parameters
    assert loaded.bytes == plan.bytes


def test_saved_rows_file_holds_the_remap(tmp_path: Path) -> None:
    _mixed_plan().save(tmp_path / "p")
    rows = pl.read_parquet(tmp_path / "p" / "rows" / "item.parquet")
    bucket, local = _reference_remap(ROW_DIMS.tolist())
    assert rows.to_dict(as_series=False) == {
        "row": list(range(6)),
        "raw_id": RAW_IDS.tolist(),
        "dim": ROW_DIMS.tolist(),
        "bucket": bucket,
        "local_row": local,
    }
    body = json.loads((tmp_path / "p" / PLAN_FILE).read_text())
    assert (body["format"], body["version"], body["parameters"], body["bytes"]) == (
        "dimsearch-plan",
        PLAN_VERSION,
        116,
        464,
    )
    assert set(body["checksums"]["files"]) == {"rows/item.parquet"}


def test_save_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "plan"
    _mixed_plan().save(target)
    uniform_plan(["a"], {"a": 3}, 4).save(target)  # overwrite: the old plan's row files go too
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]
    assert sorted(p.name for p in target.iterdir()) == [PLAN_FILE]
    assert DimensionPlan.load(target).feature_names == ["a"]

    # A save that fails half-way leaves the previous plan intact and no temp directory behind.
    broken = _mixed_plan(provenance={"model": object()})
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        broken.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]
    assert DimensionPlan.load(target).feature_names == ["a"]


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"nowhere/plan\.json: no plan here"):
        DimensionPlan.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match=r"empty/plan\.json: no plan here"):
        DimensionPlan.load(tmp_path / "empty")
    _mixed_plan().save(tmp_path / "p")
    (tmp_path / "p" / "rows" / "item.parquet").unlink()
    with pytest.raises(PlanError, match=r"rows/item\.parquet: row file listed in the plan is missing"):
        DimensionPlan.load(tmp_path / "p")


def test_load_rejects_damaged_json_format_and_version(tmp_path: Path) -> None:
    d = _mixed_plan().save(tmp_path / "p")
    (d / PLAN_FILE).write_text((d / PLAN_FILE).read_text()[:-10])
    with pytest.raises(PlanError, match=r"plan\.json: not valid JSON .*export the plan again"):
        DimensionPlan.load(d)

    d = _mixed_plan().save(tmp_path / "p")
    _edit_json(d, lambda b: b.update(version=PLAN_VERSION + 1))
    with pytest.raises(PlanError, match=rf"plan version {PLAN_VERSION + 1} is not supported .* versions \[1, 2, 3\]"):
        DimensionPlan.load(d)

    d = _mixed_plan().save(tmp_path / "p")
    _edit_json(d, lambda b: b.update(format="other"))
    with pytest.raises(PlanError, match=r"format is 'other', expected 'dimsearch-plan'"):
        DimensionPlan.load(d)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda b: b["features"][0].update(dim=4), id="dim"),
        pytest.param(lambda b: b["features"][1].update(num_embeddings=7), id="rows"),
        pytest.param(lambda b: b.update(budget={"value": 1, "unit": "parameters"}), id="budget"),
        pytest.param(lambda b: b["provenance"].update(method="hand-edited"), id="provenance"),
        pytest.param(lambda b: b.pop("checksums"), id="no-checksums"),
    ],
)
def test_load_rejects_json_edited_after_save(tmp_path: Path, edit: Any) -> None:
    d = _mixed_plan(provenance={"method": "fixed"}).save(tmp_path / "p")
    _edit_json(d, edit)
    with pytest.raises(PlanError, match="checksum mismatch: the plan was edited or damaged after it was saved"):
        DimensionPlan.load(d)


def test_load_rejects_rows_edited_after_save(tmp_path: Path) -> None:
    d = _mixed_plan().save(tmp_path / "p")
    rows_path = d / "rows" / "item.parquet"
    rows = pl.read_parquet(rows_path)
    rows.with_columns(pl.lit(8, dtype=pl.Int64).alias("dim")).write_parquet(rows_path)
    with pytest.raises(PlanError, match=r"rows/item\.parquet: checksum mismatch: the row file was changed"):
        DimensionPlan.load(d)


def test_load_validates_dims_even_with_valid_checksums(tmp_path: Path) -> None:
    # A plan written by some other tool, with consistent checksums but invalid content.
    d = _mixed_plan().save(tmp_path / "p")
    _edit_json(d, lambda b: b["features"][0].update(dim=0, output_dim=0), reseal=True)
    with pytest.raises(PlanError, match=r"plan\.json: feature 'user': dim is 0; dims must be > 0"):
        DimensionPlan.load(d)

    d = _mixed_plan().save(tmp_path / "p")
    rows_path = d / "rows" / "item.parquet"
    rows = pl.read_parquet(rows_path)
    rows.with_columns(pl.when(pl.col("row") == 4).then(0).otherwise(pl.col("dim")).alias("dim")).write_parquet(
        rows_path
    )
    digest = plan_module.sha256_file(rows_path)
    _edit_json(d, lambda b: b["checksums"]["files"].update({"rows/item.parquet": digest}))
    # A dim-0 row is one not stored; with no shared table to serve it, the plan is refused.
    with pytest.raises(PlanError, match=r"plan\.json: feature 'item': 1 rows have dim 0 \(not stored\)"):
        DimensionPlan.load(d)


def test_load_rejects_row_count_mismatch(tmp_path: Path) -> None:
    d = _mixed_plan().save(tmp_path / "p")
    rows_path = d / "rows" / "item.parquet"
    pl.read_parquet(rows_path).head(5).write_parquet(rows_path)
    digest = plan_module.sha256_file(rows_path)
    _edit_json(d, lambda b: b["checksums"]["files"].update({"rows/item.parquet": digest}))
    with pytest.raises(PlanError, match=r"rows/item\.parquet: 5 rows, plan says 6"):
        DimensionPlan.load(d)


def test_load_rejects_plan_over_its_budget(tmp_path: Path) -> None:
    # save does not check the budget (a search may export an over-budget plan to inspect); load does.
    d = _mixed_plan(budget=Budget(100)).save(tmp_path / "p")
    with pytest.raises(
        PlanError,
        match=r"plan\.json: the plan needs 116 parameters but the budget is 100 "
        r"\(parameters per feature: user=80, item=36\)",
    ):
        DimensionPlan.load(d)


# --- vocabulary -----------------------------------------------------------------------------------


def test_check_vocabulary() -> None:
    p = _mixed_plan()
    p.check_vocabulary({"user": 10, "item": 6}, {"item": RAW_IDS[1:]})
    p.check_vocabulary({"user": 3, "item": 4, "extra": 9}, {"item": RAW_IDS[1:4]})  # a smaller vocabulary fits
    with pytest.raises(PlanError, match=r"feature 'item': the vocabulary has 7 rows but the plan only 6\. Re-plan"):
        p.check_vocabulary({"user": 10, "item": 7})
    with pytest.raises(PlanError, match=r"feature 'user': the vocabulary has 11 rows but the plan only 10"):
        p.check_vocabulary({"user": 11, "item": 6})
    with pytest.raises(PlanError, match=r"feature 'item': row 3 is raw id 30 in the plan but 99 in the vocabulary"):
        p.check_vocabulary({"user": 10, "item": 6}, {"item": np.array([10, 20, 99, 40])})
    with pytest.raises(
        PlanError, match=r"the plan sizes features \['user'\] that the dataset does not have \(\['item'\]\)"
    ):
        p.check_vocabulary({"item": 6})


# --- summary --------------------------------------------------------------------------------------


def test_summary_lists_each_feature_and_total() -> None:
    text = _mixed_plan(budget=Budget(200)).summary()
    lines = text.splitlines()
    assert lines[0].split() == ["feature", "level", "dims", "rows", "params", "MiB", "serving", "served", "MiB"]
    assert lines[1].split() == ["user", "field", "6", "(stored", "8)", "10", "80", "0.00", "fp32", "0.00"]
    assert lines[2].split() == ["item", "row", "3..8", "(mean", "5.0)", "6", "36", "0.00", "fp32", "0.00"]
    assert lines[3] == ("total 116 parameters, 0.00 MiB to train, 0.00 MiB served; budget 200 parameters (58.0% used)")
    assert len(lines) == 4
    assert _mixed_plan().summary().splitlines()[-1] == "total 116 parameters, 0.00 MiB to train, 0.00 MiB served"


# --- precision ------------------------------------------------------------------------------------------------
def test_serving_bytes_per_dtype_and_round_trip(tmp_path: Path) -> None:
    """Serving bytes are each table's rows × its aligned row in its feature's dtype, plus fp32 projections; dtypes
    survive save/load, and a version-1 plan (no dtype) reads as fp32."""
    plan = _mixed_plan().with_dtypes({"user": "int4", "item": "fp16"})
    # user: 10 rows stored 8 wide in int4 = 4 + 4 bytes -> one 16-byte row; item buckets 3/5/8 stored 4/8/8 wide in
    # fp16 = 8/16/16 bytes -> 16 each, 6 rows.
    assert row_bytes(8, "int4") == 16 and row_bytes(4, "fp16") == 16 and row_bytes(32, "int4") == 32
    assert plan.serving_bytes == 10 * 16 + 6 * 16
    assert plan.dtypes == {"t_user": "int4", "t_item__d3": "fp16", "t_item__d5": "fp16", "t_item__d8": "fp16"}
    assert _mixed_plan().serving_bytes == 4 * _mixed_plan().parameters  # fp32 rows of multiples of 4 need no padding
    loaded = DimensionPlan.load(plan.save(tmp_path / "p"))
    assert loaded.dtypes == plan.dtypes and loaded.serving_bytes == plan.serving_bytes

    def as_version_1(body: dict[str, Any]) -> None:
        body["version"] = 1
        for f in body["features"]:
            del f["dtype"]

    _edit_json(tmp_path / "p", as_version_1, reseal=True)
    assert set(DimensionPlan.load(tmp_path / "p").dtypes.values()) == {"fp32"}


def test_bad_dtype_and_impossible_serving_budget() -> None:
    with pytest.raises(PlanError, match=r"feature 'user': dtype is 'bf16', expected one of \['fp32', 'fp16'"):
        _mixed_plan().with_dtypes({"user": "bf16"})
    with pytest.raises(PlanError, match=r"dtypes name features \['nope'\] that the plan lacks"):
        _mixed_plan().with_dtypes({"nope": "int8"})
    with pytest.raises(PlanError, match=r"budget unit is 'gigabytes', expected one of"):
        Budget(1, "gigabytes")  # type: ignore[arg-type]
    plan = _mixed_plan(budget=Budget(255, "serving_bytes")).with_dtypes("int8")
    with pytest.raises(PlanError, match=r"needs 256 serving_bytes but the budget is 255 .*user=160 \(int8\)"):
        plan.check_budget()
