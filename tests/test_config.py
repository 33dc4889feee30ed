"""Config validation: the Hydra tree composes, and typos / wrong types / bad values fail naming the key."""

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from torchrec_shark.conf_store import register_configs
from torchrec_shark.config import ConfigError, TrainConfig, validate

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
        (["tables=shark", "tables.compression.mixed_precision.fp16_fraction=0.5"], "fractions"),
        (["tables=tt", "tables.compression.tensor_train.ranks=[0]"], "ranks"),
        (["trainer.embedding_optimizer=lion"], "trainer.embedding_optimizer='lion'"),
        (["trainer.init_from=/no/such/run"], "trainer.init_from"),
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
