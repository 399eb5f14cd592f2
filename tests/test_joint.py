"""The joint dims × precision search: its knapsack against brute force, its cut-and-quantise scoring against
TorchRec's quantised tables, its errors, and the search in the training job on 2 ranks (static split and stream),
every plan within its serving-byte budget and served as chosen."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from jobs.config import ConfigError, load_config
from jobs.evaluate import evaluate
from jobs.export import export, load_bundle
from models.recommender import served_columns
from search.base import SearchConfigError, SearchContext
from search.joint import RESOLUTION, JointSearcher, JointSettings, solve_knapsack
from sharding.plan import DimensionPlan, PlanError, row_bytes
from tests.helpers import REPO, metrics_records, run_train_job, tiny_job_args


def _brute_force(costs: list[np.ndarray], values: list[np.ndarray], budget: float) -> float:
    best = np.inf
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[k] for c, k in zip(costs, pick, strict=True)) <= budget:
            best = min(best, sum(v[k] for v, k in zip(values, pick, strict=True)))
    return float(best)


def test_knapsack_is_optimal_within_its_rounding_and_never_over_budget() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        groups = int(rng.integers(1, 5))
        costs = [rng.integers(1, 10_000, int(rng.integers(1, 6))) for _ in range(groups)]
        values = [rng.normal(size=c.size) for c in costs]
        cheapest = sum(int(c.min()) for c in costs)
        budget = int(rng.integers(cheapest, cheapest + 20_000))
        pick = solve_knapsack(costs, values, budget)
        cost = sum(int(c[k]) for c, k in zip(costs, pick, strict=True))
        value = sum(float(v[k]) for v, k in zip(values, pick, strict=True))
        assert cost <= budget
        assert value >= _brute_force(costs, values, budget) - 1e-9  # nothing beats the true optimum
        slack = budget * (1 - groups / RESOLUTION)  # every plan with a unit per group to spare is considered
        assert value <= _brute_force(costs, values, slack) + 1e-9
    with pytest.raises(PlanError, match=r"no plan fits a budget of 99 serving bytes: the smallest .* is 100"):
        solve_knapsack([np.array([50, 70]), np.array([50])], [np.zeros(2), np.zeros(1)], 99)


@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4"])
def test_scoring_a_cut_in_a_dtype_equals_the_quantised_table(dtype: str) -> None:
    """`served_columns` on a single-hot pooled vector cut to 8 of 16 columns equals looking the row up in
    TorchRec's quantised table of those 8 columns (what the plan serves)."""
    from torchrec.inference.modules import quantize_inference_model

    torch.manual_seed(0)
    table = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=50, feature_names=["f"])
    ebc = EmbeddingBagCollection(tables=[table])
    rows = torch.tensor([3, 7, 7, 0, 49])
    kjt = KeyedJaggedTensor(keys=["f"], values=rows, lengths=torch.ones(5, dtype=torch.int64))
    with torch.no_grad():
        scored = served_columns(ebc(kjt)["f"], dtype, torch.full((5,), 8))
        narrow = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])]
        )
        narrow.embedding_bags["t"].weight.copy_(ebc.embedding_bags["t"].weight[:, :8])
        wrapper = torch.nn.Sequential()
        wrapper.add_module("ebc", narrow)
        dt = {"fp16": torch.float16, "int8": torch.qint8, "int4": torch.quint4x2}[dtype]
        quant = quantize_inference_model(wrapper, per_table_weight_dtype={"t": dt})
        served = quant.ebc(kjt)["f"]
    assert torch.equal(scored[:, :8], served) and not scored[:, 8:].any()
    assert not torch.equal(served, ebc.embedding_bags["t"].weight[rows, :8])  # the dtype did round


def test_bad_settings_and_impossible_budgets(tmp_path: Path) -> None:
    with pytest.raises(SearchConfigError, match=r"give exactly one of search\.joint\.budget_bytes or"):
        JointSettings()
    with pytest.raises(SearchConfigError, match=r"dims must be positive multiples of 4, got \[6\]"):
        JointSettings(budget_fraction=0.5, dims=(6,))
    with pytest.raises(SearchConfigError, match=r"dtypes must be some of .*got \['int3'\]"):
        JointSettings(budget_fraction=0.5, dtypes=("int3",))
    with pytest.raises(SearchConfigError, match="takes its budget in serving bytes"):
        JointSearcher.check(SearchContext("joint", budget=1000))
    searcher = JointSearcher(JointSettings(budget_fraction=0.05), dim=16, static=True)
    # The smallest row any candidate gives is 16 bytes (rows are padded to 16): 1/4 of dim 16 in fp32.
    with pytest.raises(PlanError, match=r"no plan fits a budget of 1,280 serving bytes \(0\.0500 .*0\.2500"):
        searcher.initial_plan(["a", "b"], {"a": 200, "b": 200})
    plan = JointSearcher(JointSettings(budget_fraction=0.25), dim=16, static=True).initial_plan(["a"], {"a": 10})
    assert plan.serving_bytes == 10 * row_bytes(16, "fp32")  # it trains at search.dim in fp32 first
    config = tmp_path / "joint.yaml"
    config.write_text("search:\n  method: joint\n  dtype: int8\n  joint:\n    budget_fraction: 0.5\n")
    with pytest.raises(ConfigError, match="joint chooses each table's dtype itself"):
        load_config(config)
    shipped = load_config(REPO / "jobs/configs/joint.yaml")
    assert shipped.search.method == "joint" and isinstance(shipped.search.settings, JointSettings)


ARGS = [
    "search.method=joint", "search.dim=16", "search.joint.budget_fraction=0.3", "search.joint.env_batches=2",
    "search.joint.dims=[4,8,16]",
]  # fmt: skip


@pytest.mark.multirank
def test_static_joint_search_serves_its_choices_within_budget(data: Path, tmp_path: Path) -> None:
    run = run_train_job(tiny_job_args(data, tmp_path, "joint", *ARGS, "data.protocol=random"))
    assert run.returncode == 0, run.stderr[-3000:]
    records = metrics_records(tmp_path / "joint")
    assert [(r["phase"], r.get("epoch")) for r in records] == [("search", 0), ("train", 0), ("final", None)]
    plan = DimensionPlan.load(tmp_path / "joint" / "plan")
    full = sum(f.num_embeddings for f in plan.features) * row_bytes(16, "fp32")
    assert plan.budget is not None and plan.budget.unit == "serving_bytes" and plan.budget.value == int(0.3 * full)
    assert plan.serving_bytes <= plan.budget.value
    choices = plan.provenance["choices"]
    assert sorted(choices) == sorted(plan.feature_names) and plan.provenance["candidates"] == 12 * len(choices)
    for f in plan.features:
        c = choices[f.feature]
        assert f.dtype == c["dtype"] and c["bytes"] == f.serving_bytes
        assert f.bucket_dims == [c["dim"]]
        assert f.output_dim == 16 and (f.dim is not None or f.projection == "pad")
    # 0.3 of fp32 at 16 forces every table narrower or smaller: no table stays at 16 in fp32.
    assert all((c["dim"], c["dtype"]) != (16, "fp32") for c in choices.values())
    assert records[-1]["embedding_parameters"] == plan.parameters

    # Exported and evaluated as served: the bundle stores the chosen dtypes, and its quality is the quantised one.
    bundle = load_bundle(export(tmp_path / "joint", REPO / "jobs/configs/topology/gpu16x80.yaml", tmp_path / "b"))
    assert bundle.plan.dtypes == plan.dtypes and bundle.plan.serving_bytes == plan.serving_bytes
    report = evaluate([tmp_path / "joint"], split="test", out=tmp_path / "report")
    assert report.runs[0].overall.metrics["auc"] == pytest.approx(records[-1]["eval"]["auc"], abs=0.02)


@pytest.mark.multirank
def test_joint_search_on_a_stream_moves_once_within_budget(data: Path, tmp_path: Path) -> None:
    run = run_train_job(tiny_job_args(data, tmp_path, "stream", *ARGS))
    assert run.returncode == 0, run.stderr[-3000:]
    days = metrics_records(tmp_path / "stream")
    assert [d["reconfigured"] for d in days] == [True, False, False]
    plan = DimensionPlan.load(tmp_path / "stream" / "plan")
    assert plan.budget is not None and plan.serving_bytes <= plan.budget.value
    assert plan.provenance["method"] == "joint" and len(plan.provenance["choices"]) == len(plan.features)


def test_values_ignore_noise_and_prefer_width_then_fewer_bytes() -> None:
    """Changes within the tolerance (and gains) count as none; among them the knapsack sees the wider dim as better,
    then the cheaper dtype; a real loss is kept as measured."""
    searcher = JointSearcher(JointSettings(budget_bytes=10_000, tolerance=1e-3), dim=32, static=True)
    searcher.initial_plan(["a"], {"a": 10})
    options = [(16, "fp32"), (32, "fp16"), (32, "int4"), (8, "int8")]
    costs = [np.array([10 * row_bytes(d, q) for d, q in options])]
    deltas = [np.array([-0.01, 0.0004, 0.0009, 0.3])]  # reference loss 1.0: the first three are within 1e-3
    (values,) = searcher.values(deltas, costs, 1.0, options)
    assert np.argsort(values).tolist() == [2, 1, 0, 3]  # 32 int4, 32 fp16 (wider than 16), 16 fp32, then the loss
    assert values[3] == pytest.approx(0.3, abs=1e-6)
    assert solve_knapsack(costs, [values], 10_000) == [2]
