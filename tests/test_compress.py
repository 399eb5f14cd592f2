"""Row-level bytes, post-training compression and verification (`search.compress`, `search.verify`,
`jobs.compress`).

Unit tests compare the compressed candidates with plainly-correct references: the budget is never exceeded, the
stored rows are the most frequent ones, each shared row is the count-weighted mean of the rows it serves, and what a
candidate says each row is served as equals TorchRec's quantised lookup of the plan's tables bit for bit (dim-0 rows
through the shared table). The verification stage picks the planted best. The end-to-end test trains a tiny run
under torchrun, compresses it with `python -m jobs.compress`, and scores the bundle as served: the same figure the
verification measured, and the bundle's bytes equal the plan's accounting per table.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from jobs.export import served_model, serving_tensors
from search.compress import Candidate, Recipe, compress, recipes
from search.verify import VerificationError, verify
from sharding.budget import parse_budget
from sharding.embedding import PlannedEmbedding, RowRemap, quantize_dequantize
from sharding.plan import (
    PRECISIONS,
    DimensionPlan,
    FeaturePlan,
    PlanError,
    physical_dim,
    row_bytes,
)

EBC = "embedding.ebc.embedding_bags."


def _trained(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Two features' trained rows and Zipf-like counts (row 0, the fallback row, counts 0)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    weights = {"user": torch.randn(300, 8, generator=g), "item": torch.randn(500, 8, generator=g) * 0.3}
    counts = {f: np.concatenate([[0], rng.zipf(1.6, w.shape[0] - 1).clip(max=10_000)]) for f, w in weights.items()}
    return weights, counts


class _Lookup(nn.Module):
    """The plan's embedding layer alone (what `served_model` quantises)."""

    def __init__(self, plan: DimensionPlan) -> None:
        super().__init__()
        self.embedding = PlannedEmbedding(plan)

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.embedding(kjt)


def _served_lookup(plan: DimensionPlan, tables: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Every row of every feature looked up alone (length-1 bags) through TorchRec's quantised inference tables."""
    model = _Lookup(plan)
    state = model.state_dict()
    for t in plan.tables():
        full = torch.zeros(t.num_embeddings, t.embedding_dim)
        full[:, : t.logical_dim] = tables[t.name]
        state[f"{EBC}{t.name}.weight"] = full
    model.load_state_dict(state)
    served = served_model(copy.deepcopy(model).eval(), plan)
    n = {f.feature: f.num_embeddings for f in plan.features}
    batch = max(n.values())
    values, lengths = [], []
    for f in plan.feature_names:
        values.append(torch.arange(n[f]))
        lengths.append(torch.cat([torch.ones(n[f], dtype=torch.long), torch.zeros(batch - n[f], dtype=torch.long)]))
    kjt = KeyedJaggedTensor(keys=plan.feature_names, values=torch.cat(values), lengths=torch.cat(lengths))
    with torch.no_grad():
        out = served(RowRemap(plan)(kjt))
    return {f: out[f][: n[f]] for f in plan.feature_names}, served


def test_every_recipe_fits_and_is_served_as_it_says() -> None:
    weights, counts = _trained()
    full = sum(w.shape[0] * 32 for w in weights.values())  # FIXED-8 fp32
    budget = full // 8
    made = 0
    for recipe in recipes():
        cand = compress(weights, counts, budget, recipe, alignment=1)
        if cand is None:
            continue
        made += 1
        plan = DimensionPlan(tuple(cand.features[f] for f in weights))
        assert cand.serving_bytes == plan.serving_bytes <= budget, recipe.label
        assert set(cand.tables) == {t.name for t in plan.tables()}
        served, module = _served_lookup(plan, cand.tables)
        for f in weights:
            # Bit for bit: the candidate's own account of each row is what FBGEMM's inference lookup returns.
            assert torch.equal(served[f][:, : weights[f].shape[1]], cand.served_rows[f]), (recipe.label, f)
        stored = {n: s.numel() for n, s in serving_tensors(module, plan).items()}
        assert stored == {t.name: t.serving_bytes for t in plan.tables()}, recipe.label
    assert made >= 10  # the admission, hashing, CAFE-style and tiered recipes all fit at 1/8


def test_stored_rows_are_the_most_frequent_and_shared_rows_are_weighted_means() -> None:
    weights, counts = _trained(1)
    recipe = Recipe("cafe", "int8", shared_share=0.3, shared_dtype="int4")
    cand = compress(weights, counts, 2_500, recipe, alignment=1)
    assert cand is not None
    # Ranked over both features at once: every stored row counts at least as much as every unstored one.
    stored_min = min(float(counts[f][np.asarray(p.row_dims) > 0].min()) for f, p in cand.features.items())
    unstored_max = max(float(counts[f][1:][np.asarray(p.row_dims)[1:] == 0].max()) for f, p in cand.features.items())
    assert stored_min >= unstored_max
    for f, p in cand.features.items():
        assert p.row_dims is not None and p.row_dims[0] == 0  # unseen ids share the cold rows' vector
        slots = p.shared_slots()
        shared = cand.tables[f"t_{f}__shared"]
        assert shared.shape == (p.shared_rows, 8) and p.shared_rows > 1
        for s in range(p.shared_rows):  # the slow reference: a loop over the slot's members
            members = [r for r in range(p.num_embeddings) if p.row_dims[r] == 0 and slots[r] == s]
            if not members:
                continue
            c = np.array([counts[f][r] for r in members], dtype=np.float64)
            c = c if c.sum() > 0 else np.ones_like(c)
            mean = sum(ci * weights[f][r].double() for ci, r in zip(c, members, strict=True)) / c.sum()
            torch.testing.assert_close(shared[s], mean.float(), rtol=1e-5, atol=1e-6)
            # Dim-0 rows are served by their shared row, in the shared table's dtype.
            served = quantize_dequantize(shared[s : s + 1], "int4")[0]
            for r in members:
                assert torch.equal(cand.served_rows[f][r], served)


def test_admission_hashing_and_uniform_edges() -> None:
    weights, counts = _trained(2)
    rows = sum(w.shape[0] for w in weights.values())
    # Admission: one shared row per feature, everything else in the budget stored in one dtype.
    adm = compress(weights, counts, rows * 6 // 2, Recipe("admission", "int4"), alignment=1)
    assert adm is not None
    assert all(p.shared_rows == 1 for p in adm.features.values())
    assert {t.dtype for p in adm.features.values() for t in p.tables()[:-1]} == {"int4"}
    # Hashing: no row of its own beyond what rounding leaves; the shared tables hold the budget.
    hashing = compress(
        weights, counts, rows * 6 // 4, Recipe("hashing", "int4", hot_share=0, shared_share=1, shared_dtype="int4"), 1
    )
    assert hashing is not None and hashing.stored_share < 0.01
    assert sum(p.shared_rows for p in hashing.features.values()) * row_bytes(8, "int4", 1) > 0.98 * (rows * 6 // 4)
    # A budget every row fits in: the uniform plan is the candidate, the other recipes step aside.
    assert compress(weights, counts, rows * 100, Recipe("admission", "int4"), 1) is None
    uniform = compress(weights, counts, rows * 8, Recipe("uniform", "int4"), 1)  # 4 bytes of codes + scale, bias
    assert uniform is not None and all(not p.row_level and p.dtype == "int4" for p in uniform.features.values())
    assert compress(weights, counts, rows * 8 - 1, Recipe("uniform", "int4"), 1) is None
    # Too small for even the shared rows: no candidate.
    assert compress(weights, counts, 5, Recipe("admission", "int8"), 1) is None


def test_row_level_plan_round_trips_with_dtypes_and_shared_rows(tmp_path: Path) -> None:
    weights, counts = _trained(3)
    cand = compress(weights, counts, 3_000, Recipe("tiered", "int8", "int2", hot_share=0.4), alignment=2)
    assert cand is not None
    plan = DimensionPlan(tuple(cand.features[f] for f in weights))
    back = DimensionPlan.load(plan.save(tmp_path / "plan"))
    assert [t for t in back.tables()] == plan.tables()
    assert back.serving_bytes == plan.serving_bytes
    for f in plan.features:
        g = back[f.feature]
        assert np.array_equal(g.row_dims, f.row_dims) and np.array_equal(g.row_dtypes, f.row_dtypes)
        assert np.array_equal(g.remap[0], f.remap[0]) and np.array_equal(g.remap[1], f.remap[1])
        assert (g.shared_rows, g.shared_dim, g.shared_dtype) == (f.shared_rows, f.shared_dim, f.shared_dtype)
    names = {t.name for t in plan.tables()}
    assert {"t_user__d8_int8", "t_user__d8_int2", "t_user__shared"} <= names


def test_remap_matches_a_slow_reference() -> None:
    rng = np.random.default_rng(4)
    dims = rng.choice([0, 4, 8], 200)
    codes = rng.choice([1, 2, 3, 4], 200)
    codes[(dims == 4) & (codes == 4)] = 3  # int2 needs 8 stored columns
    with pytest.raises(PlanError, match=r"int2 tables of dims \[4\]: FBGEMM packs int2 rows into 2-byte words"):
        FeaturePlan("f", 200, 8, row_dims=dims, row_dtypes=np.where(dims == 4, 4, codes), shared_rows=7)
    f = FeaturePlan("f", 200, 8, row_dims=dims, row_dtypes=codes, shared_rows=7, shared_dtype="int4")
    bucket, local = f.remap
    tables = f.tables()
    assert tables[-1].name == "t_f__shared" and tables[-1].num_embeddings == 7
    seen: dict[int, int] = {}
    for r in range(200):
        if dims[r] == 0:
            assert bucket[r] == len(tables) - 1 and local[r] == f.shared_slots()[r]
            continue
        t = tables[bucket[r]]
        assert (t.logical_dim, t.dtype) == (dims[r], PRECISIONS[codes[r]])
        assert local[r] == seen.get(int(bucket[r]), 0)  # rows in order within their table
        seen[int(bucket[r])] = local[r] + 1
    assert all(seen[b] == tables[b].num_embeddings for b in seen)
    assert f.serving_bytes == sum(
        t.num_embeddings * row_bytes(physical_dim(t.logical_dim), t.dtype, 16) for t in tables
    )


def test_verify_picks_the_planted_best() -> None:
    # Planted: held-out AUCs are known; ties go to the fewer bytes, NaN never wins, a loss is minimised.
    cands = [("a", 0.70, 100), ("b", 0.81, 300), ("c", 0.81, 200), ("d", math.nan, 10)]
    best, scored = verify(cands, lambda c: {"auc": c[1]}, lambda c: c[2])
    assert best.candidate[0] == "c" and [s.candidate[0] for s in scored] == ["a", "b", "c", "d"]
    best, _ = verify(cands, lambda c: {"log_loss": 1 - c[1] if c[0] != "a" else 0.1}, lambda c: c[2], "log_loss")
    assert best.candidate[0] == "a"
    with pytest.raises(VerificationError, match="no candidate fits the budget"):
        verify([], lambda c: {"auc": 0.5}, lambda c: 0)
    with pytest.raises(VerificationError, match="not 'auc'"):
        verify(cands, lambda c: {"mse": 0.5}, lambda c: 0)


def test_verify_on_compressed_candidates_recovers_the_planted_rows() -> None:
    """Planted: held-out lookups hit rows that the training counts call cold. Scored on held-out rows, the
    verification prefers the candidate that stores those rows (uniform int2 stores every row) over admission by
    training counts, which a ranking by training counts alone would have chosen."""
    weights, counts = _trained(5)
    held_out = {f: torch.from_numpy(np.where(c > 1, 0.0, 50.0)) for f, c in counts.items()}  # cold rows only
    budget = sum(w.shape[0] for w in weights.values()) * row_bytes(8, "int2", 1)
    options: list[Candidate] = []
    for r in (Recipe("uniform", "int2"), Recipe("admission", "int8")):
        cand = compress(weights, counts, budget, r, 1)
        assert cand is not None
        options.append(cand)

    def held_out_error(c: Candidate) -> dict[str, float]:
        errors = [(held_out[f][:, None] * (c.served_rows[f] - weights[f]).double() ** 2).sum() for f in weights]
        return {"loss": float(sum(errors))}

    best, scored = verify(options, held_out_error, lambda c: c.serving_bytes, "loss")
    assert best.candidate is options[0] and scored[0].metrics["loss"] < scored[1].metrics["loss"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("half", r"--budget is 'half'; expected a number .* '1/16 of fixed-16 fp32'"),
        ("1/16 of fixed-16 int3", r"the reference dtype is 'int3', expected one of"),
        ("0 of fixed-16", r"the fraction must be > 0"),
        ("1/0 of fixed-16", r"the fraction must be > 0"),
        ("1/16 of fixed-0", r"the reference dim must be > 0"),
        ("0", r"--budget is 0; it must be > 0"),
    ],
)
def test_bad_budget_strings_are_named(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_budget(text, "--budget")


def test_budget_strings_resolve_against_the_tables() -> None:
    rows = {"a": 100, "b": 60}
    assert parse_budget("1/16 of fixed-16 fp32").resolve(rows, "serving_bytes", 1) == 160 * 64 // 16
    assert parse_budget("6.25% of fixed-16").resolve(rows, "serving_bytes", 1) == 640
    assert parse_budget("0.5 of fixed-8 int8").resolve(rows, "serving_bytes", 16) == 160 * 16 // 2
    assert parse_budget("1/4 of fixed-6").resolve(rows, "parameters") == 160 * 8 // 4  # physical dims
    assert parse_budget(12345).resolve(rows) == parse_budget("12345").resolve(rows) == 12345


@pytest.mark.multirank
def test_compress_job_delivers_what_it_verified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.compress import main
    from jobs.evaluate import evaluate
    from jobs.export import load_bundle
    from pipeline.synthetic import SyntheticConfig, write_synthetic
    from tests.helpers import run_train_job, tiny_job_args

    cfg = SyntheticConfig(days=3, rows_per_day=3000, users=400, items=300, fields=2, field_cardinality=50, dense=2)
    data = write_synthetic(cfg, tmp_path / "data")
    done = run_train_job(tiny_job_args(data, tmp_path, "fixed8", "search.method=fixed", "search.dim=8", "data.days=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "fixed8"
    out = tmp_path / "bundle"
    args = ["--run", str(run), "--budget", "1/4 of fixed-8 fp32", "--verify-days", "2", "--row-alignment", "1"]
    main([*args, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "delivered" in printed and f"bundle: {out}" in printed
    bundle = load_bundle(out)
    info = bundle.plan.provenance["compress"]
    assert info["budget"]["text"] == "1/4 of fixed-8 fp32"
    rows = sum(f.num_embeddings for f in bundle.plan.features)
    assert info["budget"]["serving_bytes"] == rows * 32 // 4
    assert bundle.plan.serving_bytes <= info["budget"]["serving_bytes"]
    # Served bytes equal the plan's accounting, per table.
    for t in bundle.plan.tables():
        stored = torch.load(out / f"serving/{t.name}.pt", weights_only=True)
        assert stored.numel() == t.serving_bytes, t.name
    # The delivered plan is the best candidate on the verification rows, and scoring the bundle as served on those
    # rows gives the figure the verification measured.
    aucs = [c["auc"] for c in info["candidates"]]
    assert info["delivered"]["auc"] == max(aucs)
    assert any(c["recipe"].startswith("uniform") for c in info["candidates"])
    report = evaluate([out], days="2", out=tmp_path / "report")
    assert report.runs[0].overall.metrics["auc"] == pytest.approx(info["delivered"]["auc"], abs=2e-5)
    assert json.loads((out / "bundle.json").read_text())["format"] == "dimsearch-bundle"
    # The test split is refused as verification rows; a bad budget string is one line, exit 2, nothing written.
    for bad, message in [
        (["--budget", "1/8 of fixed-8", "--verify-split", "test"], "the test split is what the delivered plan"),
        (["--budget", "an eighth", "--verify-days", "2"], "--budget is 'an eighth'; expected"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--run", str(run), *bad, "--out", str(tmp_path / "nothing")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "nothing").exists()
