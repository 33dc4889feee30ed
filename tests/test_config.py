"""Config validation: the Hydra tree composes, and typos / wrong types / bad values fail naming the key."""

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from torchrec_shark.conf_store import register_configs
from torchrec_shark.config import ConfigError, TrainConfig, check_known_keys, validate

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("tables", ["baseline", "shark", "tt", "fp16", "int8"])
def test_every_tables_group_composes_and_validates(tables):
    cfg = OmegaConf.to_object(_compose([f"tables={tables}"]))
    assert isinstance(cfg, TrainConfig)
    validate(cfg)


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["trainer.max_stepz=3"])
    assert "max_stepz" in str(e.value) + str(e.value.__cause__)


def test_wrong_type_fails_naming_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["trainer.batch_size=many"])
    assert "batch_size" in str(e.value) + str(e.value.__cause__)


def test_structured_merge_rejects_unknown_nested_key():
    with pytest.raises(ConfigKeyError, match="fp33_fraction"):
        OmegaConf.merge(OmegaConf.structured(TrainConfig),
                        {"tables": {"compression": {"mixed_precision": {"fp33_fraction": 0.1}}}})


def test_wrong_type_in_structured_merge():
    with pytest.raises(ValidationError, match="eval_every"):
        OmegaConf.merge(OmegaConf.structured(TrainConfig), {"trainer": {"eval_every": "often"}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data=criteo_tsv", "data.path=/does/not/exist.tsv"], "data.path='/does/not/exist.tsv' does not exist"),
        (["data=criteo_tsv", "data.path=null"], "data.path is required"),
        (["planner.sharding_types=[diagonal]"], "planner.sharding_types='diagonal'"),
        (["tables.embedding_dim=30"], "tables.embedding_dim=30"),
        (["tables=shark_3tier", "tables.compression.mixed_precision.tiers.1.fraction=0.5"],
         "tables.compression.mixed_precision: MixedPrecision.tiers fractions [0.1, 0.5, 0.6] must be >= 0 and sum to 1"),
        (["tables=shark", "tables.compression.mixed_precision.tiers=[{precision:int8,fraction:0.5},"
                          "{precision:fp32,fraction:0.5}]"], "most precise first"),
        (["tables=shark", "tables.compression.mixed_precision.tiers=[{precision:fp8,fraction:1.0}]"],
         "precisions ['fp8'] must be among"),
        (["tables=int8", "tables.compression.uniform.rounding=up"],
         "tables.compression.uniform: Uniform.rounding='up'"),
        (["tables.compression.kind=int3"], "tables.compression.kind='int3'"),
        (["tables=tt", "tables.compression.tensor_train.ranks=[0]"], "TensorTrain.ranks=[0]"),
        (["trainer.embedding_optimizer=lion"], "trainer.embedding_optimizer='lion'"),
        (["trainer.init_from=/no/such/run"], "trainer.init_from"),
        (["trainer.embedding_lr=-0.1"], "trainer.embedding_lr=-0.1 must be positive"),
        (["trainer.dense_lr=0"], "trainer.dense_lr=0.0 must be positive"),
        (["trainer.max_steps=0"], "trainer.max_steps=0 must be positive, or 0 with trainer.init_from"),
        (["data=tabular", f"data.path={CONF}", "data.dense_transform=sqrt"], "data.dense_transform='sqrt'"),
        (["data=tabular", f"data.path={CONF}", "+data.dense_transforms.price=log1p"],
         "data.dense_transforms.price: 'price' is not a data.dense column"),
        (["data=tabular", f"data.path={CONF}", "data.dense=[price]", "+data.dense_transforms.price=cube"],
         "data.dense_transforms.price='cube'"),
        (["data=tabular", f"data.path={CONF}", "data.num_buckets=1"], "data.num_buckets=1"),
        (["data=tabular", f"data.path={CONF}", "data.min_count=256"], "data.min_count=256"),
    ],
)
def test_semantic_errors_name_the_key(overrides, message):
    cfg = OmegaConf.to_object(_compose(overrides))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert message in str(e.value)


@pytest.mark.parametrize("override, key, expected", [
    ("planner.per_table={t_f00:[table_wise]}", "planner.per_table", {"t_f00": ["table_wise"]}),
    ("planner.per_table.t_f00=[row_wise]", "planner.per_table", {"t_f00": ["row_wise"]}),
    ("+planner.per_table.t_f00=[row_wise]", "planner.per_table", {"t_f00": ["row_wise"]}),
    ("tables.init_columns={t_f00:[0,2]}", "tables.init_columns", {"t_f00": [0, 2]}),
])
def test_mappings_take_new_keys_without_plus(override, key, expected):
    dcfg = _compose([override])
    check_known_keys(dcfg, TrainConfig)
    cfg = OmegaConf.to_object(dcfg)
    validate(cfg)
    assert OmegaConf.to_container(OmegaConf.select(dcfg, key)) == expected


def test_per_table_overrides_as_the_readme_writes_them():
    dcfg = _compose(["tables=tt", "tables.overrides={t_f00:{compression:{kind:tensor_train,"
                                  "tensor_train:{ranks:[16],cache_fraction:0.001}}}}"])
    check_known_keys(dcfg, TrainConfig)
    cfg = OmegaConf.to_object(dcfg)
    validate(cfg)
    tt = cfg.tables.overrides["t_f00"].compression.tensor_train
    assert tt.ranks == [16] and tt.cache_fraction == 0.001
    # a typo inside a mapping's typed value still fails
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["tables.overrides={t_f00:{compression:{tensor_train:{rank:[16]}}}}"])
    assert "rank" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override, key", [
    ("+trainer.max_step=5", "trainer.max_step"),
    ("+tables.compression.tensor_train.rank=4", "tables.compression.tensor_train.rank"),
    ("+foo=1", "foo"),
])
def test_plus_prefixed_typo_fails_naming_the_key(override, key):
    dcfg = _compose([override])  # Hydra adds the key...
    with pytest.raises(ConfigError) as e:
        check_known_keys(dcfg, TrainConfig)  # ...and the schema check refuses it
    assert repr(key) in str(e.value)


def test_cuda_without_cuda_fails_at_validation(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = OmegaConf.to_object(_compose(["trainer.device=cuda"]))
    with pytest.raises(ConfigError, match="trainer.device=cuda but CUDA is not available"):
        validate(cfg)
