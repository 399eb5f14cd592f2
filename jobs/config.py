"""Job configuration: one frozen dataclass per concern, loaded from YAML with `section.key=value` overrides.

Unknown sections or keys, and values of the wrong type, are errors; all problems are collected into one message
(as torchtune does). The resolved config is saved with every run, checkpoint and exported plan.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from search import registry
from search.base import SearchConfigError, SearchContext
from sharding.budget import parse_budget
from sharding.distributed import ShardingConfig
from sharding.plan import PRECISIONS, ROW_ALIGNMENTS, PlanError


class ConfigError(ValueError):
    """A config file or override that does not fit the job's dataclasses."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but reading `1e-3` as a float: YAML 1.1's float pattern demands a dot, so plain
    `safe_load` turns exponent-only numbers (common for learning rates) into strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is batched.

    Args:
        path: a dataset directory (`dataset.yaml` + `day=YYYY-MM-DD/` partitions).
        days: use only the first N days (None: all).
        batch_size: examples per batch per rank.
        capacity: rows per feature table, fallback row included; None sizes each table to the number of distinct
            ids in the data (+1), read from the Parquet files before training (a count, not the ids).
        prefetch: batches built ahead in a background thread.
        chunk_rows: the most rows a rank reads from Parquet at once (rounded down to whole batches): with the
            prefetch, what bounds the data path's memory, whatever the size of a day.
        protocol: `prequential` (per day: evaluate, then train on it) or a static split — `random` (AutoDim's
            80/10/10), `per-user` (CIESS's 50/25/25) or `given` (the source's split column) — trained for
            `train.epochs` epochs on train, evaluated on valid after each epoch and on test at the end.
        fractions: train/valid/test fractions of a static split (None: the protocol's default).
        split_seed: seeds the split.
    """

    path: str = "runs/demo-data/synthetic"
    days: int | None = None
    batch_size: int = 2048
    capacity: int | None = None
    prefetch: int = 2
    chunk_rows: int = 1_000_000
    protocol: Literal["prequential", "random", "per-user", "given"] = "prequential"
    fractions: tuple[float, ...] | None = None
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.days is not None and self.days < 1:
            raise ConfigError(f"data.days must be >= 1 or null, got {self.days}")
        if self.chunk_rows < 1:
            raise ConfigError(f"data.chunk_rows must be >= 1, got {self.chunk_rows} (e.g. 1000000)")
        if self.capacity is not None and self.capacity < 2:
            raise ConfigError(f"data.capacity must be >= 2 (the fallback row and one id), got {self.capacity}")
        if self.fractions is not None and (len(self.fractions) != 3 or abs(sum(self.fractions) - 1) > 1e-9):
            raise ConfigError(
                f"data.fractions must be three numbers (train, valid, test) summing to 1, got {self.fractions}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The dense model on top of the embeddings.

    Args:
        name: `dlrm`, `deepfm`, `mf` or `ncf` (see `models.factory.build_model`).
        dense_lr: Adagrad learning rate of the dense parameters.
        options: extra options of the model's config dataclass (e.g. `{top_mlp: [64, 32]}`).
    """

    name: Literal["dlrm", "deepfm", "mf", "ncf"] = "dlrm"
    dense_lr: float = 0.05
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dense_lr <= 0:
            raise ConfigError(f"model.dense_lr must be > 0, got {self.dense_lr}")


@dataclass(frozen=True)
class SearchConfig:
    """The dimension search: what every method shares, plus the chosen method's own section.

    Args:
        method: a method of `search.registry` (the README's method table says when to use which): `fixed`,
            `uniform-budget`, `autodim`, `scall`, `esapn`, ...
        dim: every feature's dim for `fixed`; the largest row size (d_max) for the row-level methods.
        budget: embedding parameter budget the plan must meet (None: no budget; some methods need one): a number,
            or a fraction of a uniform reference plan over the dataset's tables, e.g. `1/4 of fixed-16` (its
            physical parameters; `sharding.budget.BUDGET_SYNTAX`), resolved once the tables' rows are known and
            logged (`resolved_budget`).
        other_dim: for the row-level methods, the field-level dim of every feature other than users and items
            (None: `dim`); it comes off the budget first.
        plan: start from this saved `DimensionPlan` directory (e.g. one a search exported) instead of `dim`; its
            features must be the dataset's and its tables large enough for the data's ids.
        dtype: the dtype serving stores every table in (`fp32`, `fp16`, `int8`, `int4`): training stays fp32 and
            the export quantises, and `jobs.evaluate` scores the quantised model. The `joint` method chooses each
            table's dtype itself (leave this at fp32).
        row_alignment: the bytes every served row is padded to: 16 (TorchRec's default; GPU serving needs it) or
            1, 2, 4, 8 (FBGEMM's CPU inference kernels read those too). Serving bytes count it.
        settings: the method's own settings, read from the section named after it (`search.autodim.arch_lr`,
            `search.scall.action`, ...): the dataclass its searcher names (`settings_class`), validated there.
            A section of another method is an error.
    """

    method: str = "fixed"
    dim: int = 16
    budget: int | str | None = None
    other_dim: int | None = None
    plan: str | None = None
    dtype: str = "fp32"
    row_alignment: int = 16
    settings: Any = None

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS:
            raise ConfigError(f"search.dtype is {self.dtype!r}, expected one of {list(PRECISIONS)}")
        if self.row_alignment not in ROW_ALIGNMENTS:
            raise ConfigError(f"search.row_alignment is {self.row_alignment!r}, expected one of {list(ROW_ALIGNMENTS)}")
        if self.method == "joint" and self.dtype != "fp32":
            raise ConfigError(
                f"search.dtype is {self.dtype!r}, but search.method=joint chooses each table's dtype itself: "
                "leave search.dtype at fp32"
            )
        if self.dim <= 0:
            raise ConfigError(f"search.dim must be > 0, got {self.dim}")
        if self.other_dim is not None and self.other_dim <= 0:
            raise ConfigError(f"search.other_dim must be > 0 or null, got {self.other_dim}")
        if isinstance(self.budget, int) and self.budget <= 0:
            raise ConfigError(f"search.budget must be > 0, got {self.budget}")
        if isinstance(self.budget, str):
            try:
                parse_budget(self.budget, "search.budget")
            except PlanError as e:
                raise ConfigError(str(e)) from None
        try:
            cls = registry.settings_class(self.method)
        except SearchConfigError as e:
            raise ConfigError(str(e)) from None
        if self.settings is None:
            object.__setattr__(self, "settings", cls())
        elif not isinstance(self.settings, cls):
            raise ConfigError(f"search.settings for method '{self.method}' must be a {cls.__name__}")

    def resolved_budget(self, num_embeddings: Mapping[str, int] | None) -> int | None:
        """`budget` in parameters: the number, or its fraction of the reference over `num_embeddings` (the tables'
        rows; None before they are known: then a fraction stands in as 1, enough for checks that only ask whether
        a budget is set)."""
        if self.budget is None or isinstance(self.budget, int):
            return self.budget
        request = parse_budget(self.budget, "search.budget")
        return 1 if num_embeddings is None else request.resolve(num_embeddings, "parameters")

    def context(self, num_embeddings: Mapping[str, int] | None = None, **dataset: Any) -> SearchContext:
        """What the searcher is told of the job (the dataset's part, once known, in `dataset`; the tables' rows in
        `num_embeddings`, which a fractional budget is resolved against)."""
        return SearchContext(
            method=self.method,
            dim=self.dim,
            other_dim=self.other_dim,
            budget=self.resolved_budget(num_embeddings),
            row_alignment=self.row_alignment,
            **dataset,
        )


@dataclass(frozen=True)
class TrainConfig:
    """The run.

    Args:
        name: the run's name; it lives in `<out_dir>/<name>/`.
        out_dir: the parent of run directories.
        seed: seeds model initialisation (identical on every rank).
        device: `auto` (cuda when present), `cpu` or `cuda`.
        log_every: steps between progress log lines.
        max_steps_per_day: stop a day's training after this many steps (None: the whole day).
        checkpoint: write a DCP checkpoint after every day.
        epochs: epochs over the train split under a static `data.protocol` (the retrain phase for a search).
        max_units: stop after this many units of work (a day of one epoch) under a static protocol, as if the job
            were preempted; `--resume` continues (for drills and tests). None runs to the end.
        resume: `never` refuses to start when the run already exists (pass `--resume` or `--replace`); `auto`
            continues it after its last complete checkpoint, or starts it when there is none (what a restarted
            torchrun worker group does anyway, so use it with `--max-restarts`). `--resume` means `auto`.
    """

    name: str = "demo"
    out_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 50
    max_steps_per_day: int | None = None
    checkpoint: bool = True
    epochs: int = 1
    max_units: int | None = None
    resume: Literal["never", "auto"] = "never"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"train.name must be a plain directory name, got {self.name!r}")


@dataclass(frozen=True)
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # What the method can be checked for before the dataset is read (its protocol, budget, dims).
        context = self.search.context(protocol=self.data.protocol, model=self.model.name, seed=self.train.seed)
        try:
            registry.searcher_class(self.search.method).check(context)
        except SearchConfigError as e:
            raise ConfigError(f"[search] {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = _plain(dataclasses.asdict(self))
        settings = out["search"].pop("settings")
        if settings:
            out["search"][self.search.method] = settings
        return out

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / self.train.name


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _check_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether `value` fits type `tp` (after YAML parsing), and the value converted (lists → tuples, int → float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _check_type(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, value
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        converted = [_check_type(v, inner) for v in value]
        return all(ok for ok, _ in converted), tuple(v for _, v in converted)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool), float(value) if isinstance(
            value, int | float
        ) else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _build(cls: type, raw: dict[str, Any], section: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    if cls is SearchConfig:
        raw = dict(raw)
        if (settings := _method_settings(raw, errors)) is not None:
            kwargs["settings"] = settings
        fields.discard("settings")
    for key, value in raw.items():
        if key not in fields:
            errors.append(f"unknown key '{section}.{key}' (valid keys: {sorted(fields)})")
            continue
        ok, converted = _check_type(value, hints[key])
        if not ok:
            errors.append(f"'{section}.{key}' is {value!r} ({type(value).__name__}), expected {hints[key]}")
            continue
        kwargs[key] = converted
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        errors.append(f"[{section}] {e}")
        return None


def _method_settings(raw: dict[str, Any], errors: list[str]) -> Any:
    """Pop the method sections out of the `search` mapping `raw`, validate each with its method's settings dataclass,
    and return the chosen method's settings (None: its defaults, or an error already recorded). Sections of other
    methods are checked too, so one config can carry several methods' settings and switch with `search.method`;
    only the chosen one's are used (and saved with the run)."""
    method = raw.get("method", SearchConfig.method)
    sections = {k: raw.pop(k) for k in list(raw) if k in registry.METHODS or k == "settings"}
    if "settings" in sections:
        errors.append(f"'search.settings' is not a key: put the method's settings under 'search.{method}'")
        del sections["settings"]
    chosen = None
    for name, values in sections.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            errors.append(f"'search.{name}' must be a mapping of {name}'s settings, got {values!r}")
            continue
        cls = registry.settings_class(name)
        own = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(values) - own):
            owners = [m for m in registry.METHODS if m != name and key in _setting_names(m)]
            if owners:
                errors.append(
                    f"'search.{name}.{key}' is a setting of method {' and '.join(repr(m) for m in owners)}, not of "
                    f"'{name}'. Move it under 'search.{owners[0]}.{key}'"
                )
                values = {k: v for k, v in values.items() if k != key}
        settings = _build(cls, values, f"search.{name}", errors)
        if name == method:
            chosen = settings
    return chosen


def _setting_names(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(registry.settings_class(method))}


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` → (section, key, YAML-parsed value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.name=run1)")
    path, value = text.split("=", 1)
    section, key = path.split(".", 1)
    return section, key, yaml.load(value, Loader=_Loader) if value else None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML config, apply overrides, and validate everything at once.

    Raises:
        ConfigError: listing every unknown key, wrong type and invalid value found.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist. Fix: pass an existing --config (shipped configs are in jobs/configs/)"
            )
        loaded = yaml.load(p.read_text(), Loader=_Loader) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: expected a mapping of sections (data:, model:, sharding:, search:, train:), got "
                f"{type(loaded).__name__}. Fix: start from a shipped config in jobs/configs/"
            )
        # Copy mappings (overrides are applied to them); keep anything else as is so it is reported below.
        raw = {k: {} if v is None else dict(v) if isinstance(v, dict) else v for k, v in loaded.items()}
    errors: list[str] = []
    for text in overrides or []:
        try:
            section, key, value = parse_override(text)
        except ConfigError as e:
            errors.append(str(e))
            continue
        target = raw.setdefault(section, {})
        *parents, leaf = key.split(".")
        for parent in parents:  # `search.autodim.arch_lr=...`: a key of a nested section
            if not isinstance(target, dict):
                break
            nested = target.get(parent)
            target = target.setdefault(parent, {}) if nested is None else nested
        if isinstance(target, dict):  # a non-mapping section is reported below
            target[leaf] = value
    sections = {f.name: f.type for f in dataclasses.fields(JobConfig)}
    hints = typing.get_type_hints(JobConfig)
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            errors.append(f"unknown section '{section}' (valid sections: {sorted(sections)})")
            continue
        if not isinstance(values, dict):
            errors.append(f"section '{section}' must be a mapping, got {values!r}")
            continue
        built[section] = _build(hints[section], values, section, errors)
    cfg = None
    if not errors:
        try:
            cfg = JobConfig(**{k: v for k, v in built.items() if v is not None})
        except ConfigError as e:  # what needs two sections (a method and the protocol it can serve)
            errors.append(str(e))
    if errors or cfg is None:
        where = f" in {path}" if path else ""
        raise ConfigError(
            f"{len(errors)} problem(s) in the job config{where}:\n  - "
            + "\n  - ".join(errors)
            + f"\n  Fix: correct these in {path or 'the overrides'} or the section.key=value overrides (each section's "
            "keys, types and defaults are the dataclasses in jobs/config.py, and each method's own section the "
            "settings dataclass its searcher names in search/; shipped configs are in jobs/configs/)"
        )
    return cfg
