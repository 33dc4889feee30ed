"""Registers the structured configs with Hydra's ConfigStore.

``conf/config.yaml`` lists ``train_schema`` first in its defaults, so every group file is
merged onto :class:`~torchrec_shark.config.TrainConfig`: an unknown key or a wrong type
fails at start with a message naming it.
"""

import dataclasses
import typing

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from torchrec_shark.config import TrainConfig


def open_mappings(node: DictConfig, schema: type) -> DictConfig:
    """``node`` with Hydra's struct flag off on every ``Dict``-typed field of ``schema``.

    Hydra sets the flag on the whole config, which would make ``planner.per_table.t_f00=[...]``
    or ``'planner.per_table={t_f00:[table_wise]}'`` fail as an unknown key although a mapping
    takes any key; its values keep their declared type.
    """
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if typing.get_origin(hint) in (dict, typing.Dict):
            OmegaConf.set_struct(node[f.name], False)
        elif dataclasses.is_dataclass(hint) and isinstance(node.get(f.name), DictConfig):
            open_mappings(node[f.name], hint)
    return node


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=open_mappings(OmegaConf.structured(TrainConfig), TrainConfig))
