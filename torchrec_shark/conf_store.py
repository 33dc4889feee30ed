"""Registers the structured configs with Hydra's ConfigStore.

``conf/config.yaml`` lists ``train_schema`` first in its defaults, so every group file is
merged onto :class:`~torchrec_shark.config.TrainConfig`: an unknown key or a wrong type
fails at start with a message naming it.
"""

from hydra.core.config_store import ConfigStore

from torchrec_shark.config import TrainConfig


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
