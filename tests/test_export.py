"""The export job end to end: one tiny run trained by `jobs.train` under a real `torchrun` (2 gloo ranks, a plan
mixing field-level and row-level features), exported for 16 × 80 GB GPUs, verified, and rebuilt.

The rebuilt fp32 model predicts exactly what the trained one does, the fp16-quantised one within 2e-4 on the logits
(measured: 4e-5); re-export is byte-identical; every tampered, missing or unknown-version part is named by
`BundleError`; a topology that is too small fails with the smallest budget and leaves nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.config import ConfigError
from jobs.evaluate import evaluate
from jobs.export import (
    BUNDLE_VERSION,
    BundleError,
    ExportError,
    export,
    load_bundle,
    load_topology,
    main,
    serving_tensors,
)
from jobs.runs import load_run
from pipeline.dataset import Dataset
from pipeline.stream import DayStream, StreamConfig
from pipeline.synthetic import SyntheticConfig, write_synthetic
from sharding.plan import Budget, DimensionPlan, FeaturePlan, PlanError, row_bytes
from tests.helpers import run_train_job, tiny_job_args

pytestmark = pytest.mark.multirank
REPO = Path(__file__).resolve().parents[1]
GPU16 = REPO / "jobs/configs/topology/gpu16x80.yaml"
# Measured on this run: fp16 3.9e-5, int8 (every table) 6.7e-4, on logits up to ~2.5 in magnitude.
FP16_LOGIT_TOLERANCE = 2e-4
INT8_LOGIT_TOLERANCE = 5e-3


def _mixed_plan(data: Path) -> DimensionPlan:
    """user: row-level dims {4, 8} with learned projections; item: row-level {4, 6, 8} zero-padded to 8; tags at
    dim 6 (stored 8 wide, so the export drops a tail); the fields at dim 8."""
    from jobs.train import table_capacities

    capacity = table_capacities(Dataset(data), None)
    rng = np.random.default_rng(0)
    features = []
    for f, n in capacity.items():
        if f == "user":
            features.append(FeaturePlan(f, n, 8, row_dims=rng.choice([4, 8], n), projection="linear"))
        elif f == "item":
            features.append(FeaturePlan(f, n, 8, row_dims=rng.choice([4, 6, 8], n), projection="pad"))
        else:
            d = 6 if f == "tags" else 8
            features.append(FeaturePlan(f, n, d, dim=d))
    return DimensionPlan(tuple(features), provenance={"method": "test-mixed"})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, run directory) of one tiny run: 2 days × 2000 rows, 2 ranks."""
    root = tmp_path_factory.mktemp("export")
    cfg = SyntheticConfig(days=2, rows_per_day=2000, users=300, items=200, fields=2, field_cardinality=40, dense=2)
    data = write_synthetic(cfg, root / "data")
    _mixed_plan(data).save(root / "plan_in")
    done = run_train_job(tiny_job_args(data, root, "tiny", f"search.plan={root / 'plan_in'}"))
    assert done.returncode == 0, done.stderr[-3000:]
    return data, root / "tiny"


@pytest.fixture(scope="module")
def bundle_dir(run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(run[1], GPU16, tmp_path_factory.mktemp("bundles") / "tiny")


def test_export_verify_and_rebuilt_predictions(
    run: tuple[Path, Path], bundle_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The whole path a user takes: train (fixture) → evaluate → export (fixture) → verify → same predictions."""
    data, run_dir = run
    report = evaluate([run_dir], out=tmp_path / "report")
    assert (report.out / "report.md").is_file() and report.runs[0].overall.examples == 4000
    assert 0.0 < report.runs[0].overall.metrics["auc"] < 1.0
    bundle = load_bundle(bundle_dir)
    trained = load_run(run_dir)

    # Layout, provenance and the sharding plan for 16 GPUs.
    names = [t.name for t in bundle.plan.tables()]
    assert names == [t.name for t in trained.plan.tables()]
    assert {"t_user__d4", "t_user__d8", "t_item__d6", "t_tags"} <= set(names)
    assert sorted(p.name for p in (bundle_dir / "plan" / "rows").iterdir()) == ["item.parquet", "user.parquet"]
    export_prov = bundle.plan.provenance["export"]
    assert bundle.plan.provenance["method"] == "test-mixed"
    assert export_prov["data"]["days"] == export_prov["data"]["days_trained"] == ["2024-01-01", "2024-01-02"]
    assert export_prov["config"] == trained.cfg.to_dict()
    assert export_prov["metrics"]["last_day"]["eval"]["loss"] > 0
    assert len(export_prov["code_version"]) == 40 or export_prov["code_version"] == "unknown"
    sharding = bundle.sharding
    assert sharding["topology"]["world_size"] == 16 and sharding["topology"]["file"] == "gpu16x80.yaml"
    assert set(sharding["tables"]) == set(names)
    assert len(sharding["per_rank_bytes"]) == 16
    for t in sharding["tables"].values():
        assert {int(r) for r in t["bytes_per_rank"]} <= set(range(16)) and t["ranks"]
    assert sum(sum(t["bytes_per_rank"].values()) for t in sharding["tables"].values()) == sharding["total_bytes"]

    # Compact weights: the logical columns only, and those are the trained ones.
    state = trained.model.state_dict()
    for t in bundle.plan.tables():
        w = bundle.weights(t.name)
        assert w.shape == (t.num_embeddings, t.logical_dim)
        assert torch.equal(w, state[f"embedding.ebc.embedding_bags.{t.name}.weight"][:, : t.logical_dim])
    dense = torch.load(bundle_dir / "dense.pt", weights_only=True)
    assert {"embedding.projections.t_user__d4.weight", "embedding.projections.t_user__d8.weight"} <= set(dense)

    # Predictions on one batch of the last day (the bundle's vocabulary, no growth, rows remapped to buckets).
    dataset = Dataset(data)
    stream = DayStream(dataset, bundle.vocab, StreamConfig(batch_size=4000, prefetch=0))
    batch = next(iter(stream.batches(dataset.days[-1], grow=False)))
    batch.sparse_features = bundle.remap(batch.sparse_features)
    with torch.no_grad():
        expected = trained.model(batch)[1][1]
        rebuilt = bundle.inference_model()(batch)[1][1]
        fp16 = bundle.quantized_model(default="fp16")(batch)[1][1]
        int8 = bundle.quantized_model({"t_user__d8": "int8", "t_item__d8": "int8"}, default="fp16")(batch)[1][1]
        served = bundle.served_model()(batch)[1][1]
    assert expected.shape == (2000,)
    assert torch.equal(rebuilt, expected)
    assert torch.equal(served, expected)  # an fp32 plan is served as trained
    fp16_err = float((fp16 - expected).abs().max())
    assert 0 < fp16_err < FP16_LOGIT_TOLERANCE, fp16_err
    assert 0 < float((int8 - expected).abs().max()) < INT8_LOGIT_TOLERANCE

    # Serving bytes: the quantised tables' actual storage, rows aligned to 16 bytes.
    quant = bundle.quantized_model({"t_user__d8": "int8"}, default="fp16")
    serving = bundle.serving_bytes({"t_user__d8": "int8"}, default="fp16")
    for t in bundle.plan.tables():
        stored = quant.get_buffer(f"embedding.ebc.embedding_bags.{t.name}.weight")
        assert stored.numel() * stored.element_size() == serving[t.name], t.name
    assert row_bytes(8, "fp16") == 16 and row_bytes(6, "fp16") == 16 and row_bytes(8, "int8") == 16
    assert row_bytes(12, "fp16") == 32 and row_bytes(32, "int8") == 48 and row_bytes(4, "fp32") == 16

    # The CLI verifies and prints the per-table report.
    main(["--verify", str(bundle_dir)])
    out = capsys.readouterr().out
    assert "t_user__d4" in out and "serving bytes" in out and out.rstrip().endswith("OK")


def test_reexport_is_byte_identical(run: tuple[Path, Path], bundle_dir: Path, tmp_path: Path) -> None:
    again = export(run[1], GPU16, tmp_path / "again")
    files = sorted(p.relative_to(bundle_dir) for p in bundle_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (bundle_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    # Overwriting in place gives the same bytes too; without --overwrite an existing bundle is refused.
    export(run[1], GPU16, again, overwrite=True)
    assert (again / "bundle.json").read_bytes() == (bundle_dir / "bundle.json").read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        export(run[1], GPU16, again)


PARTS = [
    "plan/plan.json",
    "plan/rows/user.parquet",
    "weights/t_user__d4.pt",
    "weights/t_tags.pt",
    "dense.pt",
    "vocab/vocab.json",
    "vocab/000.parquet",
    "sharding_plan.json",
    "config.yaml",
    "bundle.json",
]


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_tampered_or_missing_parts_are_named(
    bundle_dir: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for rel in PARTS:
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(bundle_dir, copy)
        target = copy / rel
        if damage == "delete":
            target.unlink()
        else:
            raw = bytearray(target.read_bytes())
            raw[len(raw) // 2] ^= 0x01
            target.write_bytes(bytes(raw))
        with pytest.raises(BundleError) as err:
            load_bundle(copy)
        assert str(copy / rel) in str(err.value), (rel, damage, str(err.value))
        assert "export" in str(err.value)  # the fix
    # The CLI exits 2 with the message (on the last damaged copy).
    with pytest.raises(SystemExit) as exit_:
        main(["--verify", str(copy)])
    assert exit_.value.code == 2 and "bundle.json" in capsys.readouterr().err


def test_unknown_version_and_too_small_topology(run: tuple[Path, Path], bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "future"
    shutil.copytree(bundle_dir, copy)
    manifest = copy / "bundle.json"
    manifest.write_text(manifest.read_text().replace(f'"version": {BUNDLE_VERSION}', '"version": 99'))
    with pytest.raises(BundleError, match=r"bundle\.json: bundle version 99 is not supported .* reads version 2"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="no bundle manifest here"):
        load_bundle(tmp_path)

    small = tmp_path / "tiny2.yaml"
    small.write_text("topology:\n  world_size: 2\n  compute_device: cpu\n  hbm_cap_bytes: 20000\n")
    with pytest.raises(ExportError, match=r"tiny2\.yaml: the run does not fit .* smallest budget that fits is [\d,]+"):
        export(run[1], small, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nope")]  # no temp directory left either


def test_shipped_and_bad_topologies(tmp_path: Path) -> None:
    gpu = load_topology(GPU16)
    assert (gpu.world_size, gpu.local_world_size, gpu.compute_device) == (16, 8, "cuda")
    assert gpu.total_budget == 16 * 80 * 2**30
    cpu = load_topology(REPO / "jobs/configs/topology/cpu2.yaml")
    assert (cpu.world_size, cpu.compute_device) == (2, "cpu")
    gpu64 = load_topology(REPO / "jobs/configs/topology/gpu64x80.yaml")  # benchmarks.scale's production topology
    assert (gpu64.world_size, gpu64.local_world_size, gpu64.total_budget) == (64, 8, 64 * 80 * 2**30)
    assert sorted(p.name for p in (REPO / "jobs/configs/topology").glob("*.yaml")) == [
        "cpu2.yaml",
        "gpu16x80.yaml",
        "gpu64x80.yaml",
    ]  # every shipped topology is loaded above
    bad = tmp_path / "bad.yaml"
    bad.write_text("topology:\n  world_size: 3\n  local_world_size: 2\n  hbm_size: 1\n")
    with pytest.raises(ConfigError) as err:
        load_topology(bad)
    assert "missing key 'topology.hbm_cap_bytes'" in str(err.value)
    assert "unknown key 'topology.hbm_size'" in str(err.value)
    bad.write_text("topology:\n  world_size: 3\n  local_world_size: 2\n  hbm_cap_bytes: 10\n  gpus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_topology(bad)
    assert "unknown key 'topology.gpus'" in str(err.value)
    assert "local_world_size 2 must be >= 1 and divide world_size 3" in str(err.value)


def _dequantised(rows: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    """A plainly-correct reader of FBGEMM's stored rows: fp32/fp16 values, or int8/int4 codes after a leading fp16
    scale and bias (int4: low nibble first)."""
    if dtype in ("fp32", "fp16"):
        return rows.view(np.float32 if dtype == "fp32" else np.float16)[:, :dim].astype(np.float32)
    scale, bias = (rows[:, :4].copy().view(np.float16).astype(np.float32)[:, i : i + 1] for i in (0, 1))
    data = rows[:, 4:]
    codes = data[:, :dim] if dtype == "int8" else np.stack([data & 15, data >> 4], axis=2).reshape(len(rows), -1)
    return codes[:, :dim].astype(np.float32) * scale + bias


@pytest.mark.parametrize(("dtype", "alignment"), [("int8", 16), ("int4", 16), ("fp16", 16), ("int4", 1), ("int8", 4)])
def test_served_tables_equal_a_dequantised_reference_and_the_bundle_bytes(
    run: tuple[Path, Path], dtype: str, alignment: int, tmp_path: Path
) -> None:
    """`--dtype` serves a trained run's every table in `dtype`, rows padded to `alignment` bytes: the bundle's
    serving/ bytes are what the plan accounts, the served model's pooled embeddings are the dequantised stored rows
    summed, and its predictions differ from the fp32 model's by quantisation error only."""
    data, run_dir = run
    out = export(run_dir, GPU16, tmp_path / "b", dtype=dtype, row_alignment=alignment)  # type: ignore[arg-type]
    bundle = load_bundle(out)
    assert set(bundle.plan.dtypes.values()) == {dtype} and bundle.plan.row_alignment == alignment
    projections = sum(f.projection_parameters for f in bundle.plan.features)
    stored = {t.name: torch.load(out / f"serving/{t.name}.pt", weights_only=True) for t in bundle.plan.tables()}
    assert sum(v.numel() for v in stored.values()) == bundle.plan.serving_bytes - 4 * projections
    listed = {t["name"]: t["serving_bytes"] for t in bundle.manifest["tables"]}
    for t in bundle.plan.tables():
        assert stored[t.name].dtype == torch.uint8
        assert (
            stored[t.name].shape
            == (t.num_embeddings, row_bytes(t.embedding_dim, dtype, alignment))
            == (
                t.num_embeddings,
                listed[t.name] // t.num_embeddings,
            )
        )

    served = bundle.served_model()
    assert all(torch.equal(a, stored[n]) for n, a in serving_tensors(served, bundle.plan).items())
    dataset = Dataset(data)
    stream = DayStream(dataset, bundle.vocab, StreamConfig(batch_size=500, prefetch=0))
    batch = next(iter(stream.batches(dataset.days[-1], grow=False)))
    kjt = bundle.remap(batch.sparse_features)
    with torch.no_grad():
        pooled = served.get_submodule("embedding.ebc")(kjt).to_dict()
    for t in bundle.plan.tables():
        rows = _dequantised(stored[t.name].numpy(), dtype, t.embedding_dim)
        jt = kjt[t.key]
        sample = np.repeat(np.arange(jt.lengths().numel()), jt.lengths().numpy())
        expected = np.zeros((jt.lengths().numel(), t.embedding_dim), np.float32)
        np.add.at(expected, sample, rows[jt.values().numpy()])
        np.testing.assert_allclose(pooled[t.key].numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=t.name)
    batch.sparse_features = kjt
    with torch.no_grad():
        fp32 = bundle.inference_model()(batch)[1][1]
        logits = served(batch)[1][1]
    tolerance = {"fp16": FP16_LOGIT_TOLERANCE, "int8": INT8_LOGIT_TOLERANCE, "int4": 0.1}[dtype]
    assert 0 < float((logits - fp32).abs().max()) < tolerance


def test_serving_bytes_budget_and_bad_dtypes(run: tuple[Path, Path]) -> None:
    """A serving-bytes budget the plan meets in int8 but not in fp32 is refused in fp32 with the per-feature bytes;
    an unknown dtype names the choices."""
    plan = DimensionPlan.load(run[1] / "plan")
    int8 = plan.with_dtypes("int8").serving_bytes
    assert int8 < plan.serving_bytes
    DimensionPlan(plan.with_dtypes("int8").features, Budget(int8, "serving_bytes")).check_budget()
    with pytest.raises(PlanError, match=r"needs [\d,]+ serving_bytes but the budget is .*user=[\d,]+ \(fp32\)"):
        DimensionPlan(plan.features, Budget(int8, "serving_bytes")).check_budget()
    with pytest.raises(PlanError, match=r"dtype is 'int3', expected one of \['fp32', 'fp16', 'int8', 'int4', 'int2'\]"):
        plan.with_dtypes("int3")


def test_bundles_are_evaluated_as_served(run: tuple[Path, Path], bundle_dir: Path, tmp_path: Path) -> None:
    """`jobs.evaluate` opens a bundle as a run: an fp32 bundle scores exactly as its run, an int4 one through its
    own serving bytes (different, close)."""
    _, run_dir = run
    int4 = export(run_dir, GPU16, tmp_path / "int4", dtype="int4")
    report = evaluate([run_dir, bundle_dir, int4], out=tmp_path / "report")
    trained, fp32, served = (r.overall for r in report.runs)
    assert trained.examples == fp32.examples == served.examples == 4000
    assert fp32.metrics == trained.metrics
    assert served.metrics["auc"] != trained.metrics["auc"]
    assert abs(served.metrics["auc"] - trained.metrics["auc"]) < 0.05
    assert "| int4 |" in (report.out / "report.md").read_text()
