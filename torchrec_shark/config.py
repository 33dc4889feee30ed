"""Structured configs for ``train.py`` and the passes.

Every Hydra config group (``data``, ``model``, ``tables``, ``planner``, ``trainer``) is
validated against the dataclasses below, so an unknown key or a wrong type fails at
start with a message that names it.

Example::

    from omegaconf import OmegaConf
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"trainer": {"max_steps": 10}})
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Dict, List, Optional

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")


@dataclass
class SyntheticDataConfig:
    """Planted-model click data generated in memory (the default)."""

    # Rows are generated from (seed, block) on demand: a long cycle costs no memory and keeps every
    # default run on fresh samples (a model trained past one epoch memorises ids of the noise tables).
    num_train_samples: int = 1_000_000_000
    num_val_samples: int = 65_536
    num_dense: int = 13
    # One entry per sparse field; spans 10 .. 1e6 rows like Criteo's tables.
    cardinalities: List[int] = field(
        default_factory=lambda: [
            1_000_000, 300_000, 100_000, 100_000, 30_000, 10_000, 10_000, 3_000,
            3_000, 1_000, 1_000, 300, 300, 100, 100, 30, 30, 10,
            300_000, 100_000, 10_000, 1_000, 100, 10,
        ]
    )
    # Number of fields that carry no signal (chosen deterministically by seed).
    num_noise_fields: int = 8
    # Intrinsic dimensions of the interacting field pairs (one pair each, chosen by seed among
    # fields with >= 8 * dim rows); the other informative fields have a main effect only (dim 1).
    pair_dims: List[int] = field(default_factory=lambda: [16, 12, 8, 4, 2])
    zipf_exponent: float = 1.1
    max_bag_size: int = 3
    # Fields with index in this list are multi-hot (bag length 1..max_bag_size).
    multi_hot_fields: List[int] = field(default_factory=lambda: [3, 7, 12])
    base_ctr: float = 0.25
    # Multiplies the variance of every planted logit term.
    signal_scale: float = 1.0
    seed: int = 0


@dataclass
class DataConfig:
    """Which data source and how to read it (``data=`` group)."""

    source: str = "synthetic"  # synthetic | criteo_tsv | criteo_npy | tabular
    path: Optional[str] = None
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    # criteo_tsv / criteo_npy / tabular: rows per table (one value for all, or one per feature).
    num_embeddings_per_feature: List[int] = field(default_factory=lambda: [100_000])
    val_fraction: float = 0.1
    strict: bool = False
    # tabular files
    label: str = "label"
    dense: List[str] = field(default_factory=list)
    sparse: List[str] = field(default_factory=list)
    multi_hot_sep: str = "|"
    file_format: str = "auto"  # auto | tsv | csv | parquet
    # tabular: how dense columns reach the model (torchrec_shark/data/transforms.py), learned from the
    # training split: auto | none | log1p | standardize | minmax | bucketize. `dense_transforms` sets it
    # per column, e.g. {ts: bucketize, price: log1p}; `auto` standardizes (after log1p for a long tail).
    dense_transform: str = "auto"
    dense_transforms: Dict[str, str] = field(default_factory=dict)
    num_buckets: int = 16  # bucketize: quantile buckets per column
    # tabular: ids seen fewer than min_count times in the training split share their field's
    # out-of-vocabulary row (the last row of its table); 0 turns this off.
    min_count: int = 2
    # criteo_npy: day files used for training / validation
    train_days: List[int] = field(default_factory=lambda: [0])
    val_days: List[int] = field(default_factory=lambda: [1])


@dataclass
class ModelConfig:
    """DLRM architecture (``model=`` group)."""

    name: str = "dlrm"
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [64])
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [128, 64, 1])
    # Interaction width (last dense-arch layer); pooled embeddings of another width are projected to it.
    interaction_dim: int = 32
    projection: str = "linear"  # linear | zero_pad


def _compression_config() -> type:
    """``tables.compression``: ``kind`` plus one section per kind's settings, derived from the registered
    kinds' spec types (:mod:`torchrec_shark.modules.kinds`), so the schema cannot drift from the specs."""
    from torchrec_shark.modules.kinds import config_sections

    fields = [("kind", str, field(default="none"))]
    fields += [(name, typ, field(default_factory=typ)) for name, typ in config_sections().items()]
    cls = make_dataclass("CompressionConfig", fields)
    cls.__doc__ = ("How one table is stored: ``kind`` (a registered table kind; ``none`` is a stock FBGEMM table) "
                   "and the settings of each kind in its section.")
    cls.__module__ = __name__
    return cls


CompressionConfig = _compression_config()


@dataclass
class TableConfig:
    """One embedding table. ``num_embeddings``/``features`` default from the data source."""

    features: List[str] = field(default_factory=list)
    num_embeddings: Optional[int] = None
    embedding_dim: Optional[int] = None
    pooling: Optional[str] = None  # sum | mean; None: the collection's
    compression: Optional[CompressionConfig] = None


@dataclass
class TablesConfig:
    """The embedding collection (``tables=`` group).

    With ``tables`` empty, one table per data feature is created (``t_<feature>``), with
    ``embedding_dim`` and ``compression`` for all. An explicit ``tables`` mapping (what the
    pruning and dimension-search passes write) is authoritative: features that no table
    reads are dropped from the model.
    """

    name: str = "baseline"
    embedding_dim: int = 32
    pooling: str = "sum"
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    tables: Dict[str, TableConfig] = field(default_factory=dict)
    # Per-table overrides when tables are derived from the data: {table_name: TableConfig}.
    overrides: Dict[str, TableConfig] = field(default_factory=dict)
    # Warm start: per table, which columns of the source table to keep (dimension search).
    init_columns: Dict[str, List[int]] = field(default_factory=dict)


@dataclass
class PlannerConfig:
    """Sharding constraints for TorchRec's planner (``planner=`` group)."""

    sharding_types: List[str] = field(default_factory=list)  # empty: let the planner choose
    per_table: Dict[str, List[str]] = field(default_factory=dict)
    # Per-rank memory budget in GiB for the planner's topology (None: the device's).
    hbm_cap_gb: Optional[float] = None
    ddr_cap_gb: Optional[float] = None


@dataclass
class TrainerConfig:
    """Training loop (``trainer=`` group)."""

    # 0 with init_from: no step, the warm-started state is evaluated and saved as step 0 (e.g. a run
    # resharded to another world size)
    max_steps: int = 1500
    batch_size: int = 2048  # global: split evenly across ranks
    eval_every: int = 500
    eval_batches: int = 16
    seed: int = 0
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    dense_optimizer: str = "adam"
    dense_lr: float = 1e-3
    checkpoint_every: int = 500
    resume: bool = False
    init_from: Optional[str] = None
    progress: bool = True
    log_every: int = 50
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # torch intra-op threads per rank; 0 = cores / ranks
    # Passes over the training split (finite sources); the run stops at max_steps or here, whichever comes first.
    max_epochs: Optional[float] = None
    # Stop after this many evaluations without a better best_metric (0: never).
    early_stopping_patience: int = 0
    best_metric: str = "auc"  # auc | logloss: what "best" means for early stopping and the best checkpoint
    # Keep the best checkpoint (by best_metric) beside the latest; warm start from it with init_from=<run>@best.
    keep_best: bool = True


@dataclass
class TrainConfig:
    """Root config of ``train.py``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tables: TablesConfig = field(default_factory=TablesConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class ConfigError(ValueError):
    """A config value that cannot work, with the key that holds it."""


def check_known_keys(dcfg, schema: type) -> None:
    """Reject keys that ``schema`` does not declare, with the full key named.

    Hydra lets ``+key=value`` add a key even to a structured config, so a ``+``-prefixed typo
    (``+trainer.max_step=5``) would pass silently; re-merging onto the schema catches it.
    Mapping-typed fields (``planner.per_table``, ``tables.overrides``, ...) take any key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(dcfg, resolve=False))
    except (ConfigKeyError, ValidationError) as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"unknown or mistyped key {key!r}: {msg}") from None


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Semantic checks that types alone cannot express (``world_size``: the job's ranks). Raises
    :class:`ConfigError`."""
    import os

    if cfg.trainer.batch_size % world_size:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} must be divisible by the number of ranks "
                          f"({world_size}): each rank reads an equal slice of every batch")

    _check_choice("data.source", cfg.data.source, ("synthetic", "criteo_tsv", "criteo_npy", "tabular"))
    if cfg.data.source != "synthetic":
        if not cfg.data.path:
            raise ConfigError(f"data.path is required for data.source={cfg.data.source}")
        if not os.path.exists(cfg.data.path):
            raise ConfigError(f"data.path={cfg.data.path!r} does not exist")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    _check_data_transforms(cfg.data)
    _check_choice("model.projection", cfg.model.projection, ("linear", "zero_pad"))
    _check_choice("tables.pooling", cfg.tables.pooling, ("sum", "mean"))
    _check_compression("tables.compression", cfg.tables.compression)
    for group in ("tables", "overrides"):
        for name, t in getattr(cfg.tables, group).items():
            if t.compression is not None:
                _check_compression(f"tables.{group}.{name}.compression", t.compression)
            if t.embedding_dim is not None and (t.embedding_dim <= 0 or t.embedding_dim % 4):
                raise ConfigError(
                    f"tables.{group}.{name}.embedding_dim={t.embedding_dim} must be a positive multiple of 4"
                )
            if t.pooling is not None:
                _check_choice(f"tables.{group}.{name}.pooling", t.pooling, ("sum", "mean"))
    if cfg.tables.embedding_dim <= 0 or cfg.tables.embedding_dim % 4:
        raise ConfigError(f"tables.embedding_dim={cfg.tables.embedding_dim} must be a positive multiple of 4")
    for st in cfg.planner.sharding_types:
        _check_choice("planner.sharding_types", st, SHARDING_TYPES)
    for name, sts in cfg.planner.per_table.items():
        for st in sts:
            _check_choice(f"planner.per_table.{name}", st, SHARDING_TYPES)
    t = cfg.trainer
    _check_choice("trainer.embedding_optimizer", t.embedding_optimizer, OPTIMIZERS)
    _check_choice("trainer.dense_optimizer", t.dense_optimizer, ("sgd", "adagrad", "adam"))
    _check_choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    if t.max_steps < 0 or (t.max_steps == 0 and t.init_from is None):
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be positive, or 0 with trainer.init_from "
                          "(the warm-started state saved as step 0)")
    for key in ("batch_size", "eval_every", "eval_batches", "checkpoint_every", "embedding_lr", "dense_lr"):
        if not getattr(t, key) > 0:
            raise ConfigError(f"trainer.{key}={getattr(t, key)} must be positive")
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but CUDA is not available here "
                              "(no GPU, or a CPU build of torch): use trainer.device=cpu or auto")
    _check_choice("trainer.best_metric", t.best_metric, ("auc", "logloss"))
    if t.max_epochs is not None and t.max_epochs <= 0:
        raise ConfigError(f"trainer.max_epochs={t.max_epochs} must be positive")
    if t.early_stopping_patience < 0:
        raise ConfigError(f"trainer.early_stopping_patience={t.early_stopping_patience} must be >= 0")
    if t.init_from is not None and not os.path.isdir(_run_dir_of(t.init_from)):
        raise ConfigError(f"trainer.init_from={t.init_from!r} is not a directory")


def _run_dir_of(spec: str) -> str:
    """The run dir of a run reference (``<run_dir>`` or ``<run_dir>@best``)."""
    from torchrec_shark.training.checkpoint import split_run_spec

    return split_run_spec(spec)[0]


def _check_data_transforms(d: DataConfig) -> None:
    from torchrec_shark.data.statistics import COUNT_CAP
    from torchrec_shark.data.transforms import TRANSFORMS

    _check_choice("data.dense_transform", d.dense_transform, TRANSFORMS)
    for column, kind in d.dense_transforms.items():
        _check_choice(f"data.dense_transforms.{column}", kind, TRANSFORMS)
        if d.source == "tabular" and column not in d.dense:
            raise ConfigError(f"data.dense_transforms.{column}: {column!r} is not a data.dense column {list(d.dense)}")
    if d.num_buckets < 2:
        raise ConfigError(f"data.num_buckets={d.num_buckets} must be >= 2")
    if not 0 <= d.min_count <= COUNT_CAP:
        raise ConfigError(f"data.min_count={d.min_count} must be in [0, {COUNT_CAP}]")


# A table past every kind's size threshold (e.g. tensor train's min_rows): its spec is made, so checked.
_ANY_SIZE = 1 << 62


def _check_compression(key: str, c) -> None:
    from torchrec_shark.modules.kinds import kind_named, kind_names, spec_from_config

    _check_choice(f"{key}.kind", c.kind, kind_names())
    try:
        spec_from_config(c, _ANY_SIZE)
    except ValueError as e:
        section = kind_named(c.kind).config_section
        raise ConfigError(f"{key}{'.' + section if section else ''}: {e}") from None
