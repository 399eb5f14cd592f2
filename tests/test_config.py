from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.config import (
    ConfigError,
    DataConfig,
    JobConfig,
    ModelConfig,
    SearchConfig,
    TrainConfig,
    load_config,
    parse_override,
)
from sharding.distributed import ShardingConfig

DATA_KEYS = sorted(f.name for f in dataclasses.fields(DataConfig))

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_configs_are_shipped() -> None:
    assert "demo.yaml" in [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    # Every key written in the file made it into the config unchanged.
    raw = yaml.safe_load(path.read_text())
    resolved = cfg.to_dict()

    def contained(written: dict[str, Any], got: dict[str, Any], where: str) -> None:
        for key, value in written.items():
            if isinstance(value, dict) and where.startswith("search") and key in got:  # a method's own section
                contained(value, got[key], f"{where}.{key}")
            else:
                assert got[key] == value, f"{path.name}: {where}.{key}"

    for section, values in raw.items():
        contained(values or {}, resolved[section], section)


def test_demo_config_values() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml")
    assert cfg.data == DataConfig(path="runs/demo-data/synthetic", batch_size=2048)
    assert cfg.sharding.budget_bytes == 64 * 2**20
    assert cfg.train.log_every == 20
    assert cfg.run_dir == Path("runs/demo")


def test_no_file_no_overrides_gives_defaults() -> None:
    assert load_config(None) == JobConfig()
    assert load_config(None, []) == JobConfig()


def test_empty_file_and_empty_section_give_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == JobConfig()
    assert load_config(_write(tmp_path, "data:\nmodel:\n")) == JobConfig()


def test_overrides_apply_with_yaml_typing(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  batch_size: 64\n  days: 3\ntrain:\n  name: from-file\n")
    cfg = load_config(
        path,
        [
            "data.batch_size=128",  # int, overrides the file
            "data.days=null",  # null → None
            "data.capacity=1000",
            "model.dense_lr=0.5",  # float
            "sharding.learning_rate=1",  # int accepted for a float field, stored as float
            "sharding.sharding_types=[table_wise, row_wise]",  # list → tuple
            "search.budget=100_000",
            "sharding.planner_batch_size=1_024",
            "model.options={top_mlp: [64, 32]}",  # mapping
            "train.checkpoint=false",
            "train.name=run=1",  # only the first '=' separates key and value
        ],
    )
    assert cfg.data == DataConfig(batch_size=128, days=None, capacity=1000)
    assert cfg.model == ModelConfig(dense_lr=0.5, options={"top_mlp": [64, 32]})
    assert cfg.sharding == ShardingConfig(
        learning_rate=1.0, sharding_types=("table_wise", "row_wise"), planner_batch_size=1024
    )
    assert isinstance(cfg.sharding.learning_rate, float)
    assert cfg.sharding.sharding_types == ("table_wise", "row_wise")
    assert cfg.train == TrainConfig(name="run=1", checkpoint=False)
    assert cfg.search == SearchConfig(budget=100_000)


def test_exponent_floats_are_floats() -> None:
    # PyYAML's YAML 1.1 resolver reads `1e-3` as a string; learning rates are commonly written that way.
    cfg = load_config(None, ["sharding.learning_rate=1e-3", "model.dense_lr=2.5E+1"])
    assert cfg.sharding.learning_rate == pytest.approx(1e-3)
    assert cfg.model.dense_lr == 25.0
    with pytest.raises(ConfigError, match=r"'search.dim' is 1000\.0 \(float\), expected <class 'int'>"):
        load_config(None, ["search.dim=1e3"])


def test_empty_override_value_is_null() -> None:
    assert parse_override("data.days=") == ("data", "days", None)
    assert load_config(None, ["data.days="]).data.days is None


def test_unknown_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown section 'optim' \(valid sections: \['data', 'model', 'search', "):
        load_config(None, ["optim.lr=0.1"])


def _problems(err: pytest.ExceptionInfo[ConfigError], where: str = "the overrides") -> str:
    """The message's problem list, after checking that it ends with the fix, naming where to correct them."""
    problems, fix = str(err.value).split("\n  Fix: ")
    assert fix.startswith(f"correct these in {where} or the section.key=value overrides"), fix
    return problems


def test_unknown_key_names_key_and_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "data:\n  batchsize: 16\n"))
    assert _problems(err, str(tmp_path / "job.yaml")) == (
        f"1 problem(s) in the job config in {tmp_path / 'job.yaml'}:\n"
        "  - unknown key 'data.batchsize' "
        f"(valid keys: {DATA_KEYS})"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=abc", r"'data.batch_size' is 'abc' \(str\), expected <class 'int'>"),
        ("data.batch_size=2.5", r"'data.batch_size' is 2.5 \(float\), expected <class 'int'>"),
        ("data.batch_size=true", r"'data.batch_size' is True \(bool\), expected <class 'int'>"),
        ("data.days=x", r"'data.days' is 'x' \(str\), expected int \| None"),
        ("model.dense_lr=fast", r"'model.dense_lr' is 'fast' \(str\), expected <class 'float'>"),
        (
            "model.name=gpt",
            r"'model.name' is 'gpt' \(str\), expected .*Literal\['dlrm', 'deepfm', 'mf', 'ncf'\]",
        ),
        ("model.options=[1]", r"'model.options' is \[1\] \(list\), expected dict\[str, typing.Any\]"),
        (
            "sharding.sharding_types=table_wise",
            r"'sharding.sharding_types' is 'table_wise' \(str\), expected tuple",
        ),
        (
            "sharding.sharding_types=[1]",
            r"'sharding.sharding_types' is \[1\] \(list\), expected tuple\[str, \.\.\.\]",
        ),
        (
            "sharding.optimizer=adam",
            r"'sharding.optimizer' is 'adam' \(str\), "
            r"expected .*Literal\['sgd', 'adagrad', 'rowwise_adagrad'\]",
        ),
        ("train.checkpoint=1", r"'train.checkpoint' is 1 \(int\), expected <class 'bool'>"),
        ("train.name=7", r"'train.name' is 7 \(int\), expected <class 'str'>"),
    ],
)
def test_wrong_type_names_key_value_and_type(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^1 problem\(s\) in the job config:\n  - " + message):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", r"\[data\] data.batch_size must be >= 1, got 0"),
        ("data.days=0", r"\[data\] data.days must be >= 1 or null, got 0"),
        ("data.chunk_rows=0", r"\[data\] data.chunk_rows must be >= 1, got 0 \(e.g. 1000000\)"),
        ("data.capacity=1", r"\[data\] data.capacity must be >= 2 \(the fallback row and one id\), got 1"),
        ("model.dense_lr=0", r"\[model\] model.dense_lr must be > 0, got 0.0"),
        ("search.dim=-1", r"\[search\] search.dim must be > 0, got -1"),
        ("train.name=a/b", r"\[train\] train.name must be a plain directory name, got 'a/b'"),
        ("sharding.sharding_types=[diagonal]", r"\[sharding\] unknown sharding types \['diagonal'\]"),
        ("sharding.budget_bytes=0", r"\[sharding\] budget_bytes must be > 0, got 0"),
        ("search.method=scall", r"\[search\] search.method=scall needs search.budget"),
    ],
)
def test_invalid_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^1 problem\(s\) in the job config:\n  - " + message):
        load_config(None, [override])


def test_method_sections_are_the_methods_own_and_validated_there() -> None:
    scall = ["search.method=scall", "search.budget=1000"]
    with pytest.raises(
        ConfigError,
        match=r"^1 problem\(s\).*\n  - \[search.scall\] search.scall.action must be three numbers in \(0, 1\)",
    ):
        load_config(None, [*scall, "search.scall.action=[0.5,1.0,0.2]"])
    with pytest.raises(ConfigError, match=r"unknown key 'search.scall.nope' \(valid keys: \['action', "):
        load_config(None, [*scall, "search.scall.nope=0.1"])
    # A method's setting under another method's section names both; all problems are listed together.
    with pytest.raises(ConfigError, match=r"^2 problem\(s\)") as info:
        load_config(None, [*scall, "search.scall.arch_lr=0.1", "train.epochs=0"])
    assert (
        "'search.scall.arch_lr' is a setting of method 'autodim', not of 'scall'. Move it under "
        "'search.autodim.arch_lr'" in str(info.value)
    )
    # Other methods' sections are validated but not used: one config can switch methods with search.method.
    with pytest.raises(ConfigError, match=r"search.autodim.arch_every and search.autodim.search_epochs must be >= 1"):
        load_config(None, [*scall, "search.autodim.arch_every=0"])
    both = load_config(None, [*scall, "search.autodim.arch_lr=0.1"])
    assert "autodim" not in both.to_dict()["search"] and both.search.method == "scall"
    cfg = load_config(None, [*scall, "search.scall.action=[0.5,0.2,0.3]"])
    assert cfg.search.settings.action == (0.5, 0.2, 0.3)
    assert cfg.to_dict()["search"]["scall"] == {
        "action": [0.5, 0.2, 0.3],
        "frequency": "day",
        "env_steps": 4,
        "env_batches": 4,
    }
    autodim = load_config(None, ["search.method=autodim", "data.protocol=random", "search.autodim.arch_lr=0.5"])
    assert autodim.search.settings.arch_lr == 0.5 and autodim.search.settings.seed is None
    with pytest.raises(ConfigError, match=r"unknown search.method 'nope'; the registered methods are \[.*'autodim'"):
        load_config(None, ["search.method=nope"])


@pytest.mark.parametrize("override", ["foo", "foo=1", "batch_size=1", "=1", "data.batch_size"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"override '{override}' is not of the form section\.key=value \(e\.g\. train\.name=run1\)",
    ):
        load_config(None, [override])


def test_missing_config_file(tmp_path: Path) -> None:
    missing = r"config file .*nope\.yaml does not exist\. Fix: pass an existing --config \(shipped configs"
    with pytest.raises(ConfigError, match=missing):
        load_config(tmp_path / "nope.yaml")


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    not_a_mapping = r"job\.yaml: expected a mapping of sections \(data:, .*, train:\), got list\. Fix: "
    with pytest.raises(ConfigError, match=not_a_mapping):
        load_config(_write(tmp_path, "- data\n- model\n"))
    with pytest.raises(ConfigError, match=r"section 'data' must be a mapping, got 5"):
        load_config(_write(tmp_path, "data: 5\n"), ["data.batch_size=3"])
    with pytest.raises(ConfigError, match=r"section 'model' must be a mapping, got \['dlrm'\]"):
        load_config(_write(tmp_path, "model: [dlrm]\n"))


def test_all_problems_collected_into_one_message(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  batch_size: 0\n  shuffle: true\noptim:\n  lr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["foo", "model.dense_lr=abc", "train.name=a/b", "search.dim=0"])
    # Override syntax first, then each section in file-then-override order, each key in order.
    assert _problems(err, str(path)).splitlines() == [
        f"7 problem(s) in the job config in {path}:",
        "  - override 'foo' is not of the form section.key=value (e.g. train.name=run1)",
        f"  - unknown key 'data.shuffle' (valid keys: {DATA_KEYS})",
        "  - [data] data.batch_size must be >= 1, got 0",
        "  - unknown section 'optim' (valid sections: ['data', 'model', 'search', 'sharding', 'train'])",
        "  - 'model.dense_lr' is 'abc' (str), expected <class 'float'>",
        "  - [train] train.name must be a plain directory name, got 'a/b'",
        "  - [search] search.dim must be > 0, got 0",
    ]


def test_two_override_problems_in_one_message() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.batch_size=abc", "data.nope=1"])
    assert _problems(err) == (
        "2 problem(s) in the job config:\n"
        "  - 'data.batch_size' is 'abc' (str), expected <class 'int'>\n"
        f"  - unknown key 'data.nope' (valid keys: {DATA_KEYS})"
    )


def test_to_dict_round_trips_through_yaml(tmp_path: Path) -> None:
    for cfg in [
        JobConfig(),
        load_config(
            None,
            [
                "data.days=2",
                "model.options={top_mlp: [64, 32]}",
                "sharding.sharding_types=[table_wise]",
                "sharding.learning_rate=1e-3",
                "search.budget=100000",
                "train.device=cpu",
            ],
        ),
    ]:
        path = _write(tmp_path, yaml.safe_dump(cfg.to_dict()))
        again = load_config(path)
        assert again == cfg
        assert again.to_dict() == cfg.to_dict()


def test_unknown_method_and_scall_on_a_static_split_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"search\.method"):
        load_config(None, ["search.method=ciess-typo"])
    with pytest.raises(ConfigError, match=r"scall is a streaming search: set data\.protocol to prequential"):
        load_config(None, ["search.method=scall", "search.budget=1000", "data.protocol=random"])
    with pytest.raises(ConfigError, match=r"esapn is a streaming search: set data\.protocol to prequential"):
        load_config(None, ["search.method=esapn", "data.protocol=random"])
    with pytest.raises(ConfigError, match=r"method=esapn stores every size as it is searched: search\.dim \(18\)"):
        load_config(None, ["search.method=esapn", "search.dim=18"])
    with pytest.raises(ConfigError, match=r"search.method=esapn grows rows from 4 up to search\.dim: it must be >= 8"):
        load_config(None, ["search.method=esapn", "search.dim=4"])
    assert load_config(None, ["search.method=esapn"]).search.budget is None  # ESAPN runs without a budget too


def test_budget_as_a_fraction_of_a_reference() -> None:
    """`search.budget` may be a fraction of a uniform plan's parameters, resolved against the tables' rows; a bad
    string names the key and the syntax."""
    cfg = load_config(None, ["search.method=uniform-budget", "search.budget=1/4 of fixed-16"])
    assert cfg.search.budget == "1/4 of fixed-16"
    rows = {"user": 1000, "item": 600}
    assert cfg.search.resolved_budget(rows) == 1600 * 16 // 4
    assert cfg.search.context(num_embeddings=rows).budget == 6400
    assert load_config(None, ["search.budget=123456"]).search.resolved_budget(rows) == 123456
    with pytest.raises(ConfigError, match=r"search.budget is 'a quarter'; expected a number .* Fix: write it as"):
        load_config(None, ["search.budget=a quarter"])
    from search.registry import build_searcher

    searcher = build_searcher("uniform-budget", cfg.search.settings, cfg.search.context(num_embeddings=rows))
    plan = searcher.initial_plan(["user", "item"], rows)
    assert plan.budget is not None and plan.budget.value == 6400  # the resolved figure is what the plan saves
    assert plan.parameters <= 6400 and all(f.dim == 4 for f in plan.features)
