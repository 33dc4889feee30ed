"""``tables=`` presets to collections: stock presets build TorchRec's own collection with their weight type."""

import os

import torch
from omegaconf import OmegaConf

from torchrec_shark.config import TablesConfig
from torchrec_shark.conf_store import register_configs  # noqa: F401  (the presets' schema)
from torchrec_shark.modules import CompressedEmbeddingBagCollection
from torchrec_shark.training.table_factory import build_collection, build_table_configs, is_compressed

FEATURES, ROWS = ["a", "b"], [100, 30]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _preset(name: str, *more) -> TablesConfig:
    loaded = OmegaConf.load(os.path.join(ROOT, "conf", "tables", f"{name}.yaml"))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TablesConfig), loaded, *more))


def test_baseline_fp16_is_torchrecs_collection_with_fp16_weights():
    configs = build_table_configs(_preset("baseline_fp16"), FEATURES, ROWS)
    assert not is_compressed(configs)
    ebc = build_collection(configs, torch.device("cpu"))
    assert type(ebc).__name__ == "EmbeddingBagCollection"
    assert {p.dtype for p in ebc.parameters()} == {torch.float16}
    assert [c.data_type.name for c in ebc.embedding_bag_configs()] == ["FP16", "FP16"]


def test_stock_fp16_beside_compressed_tables_keeps_fp16_weight_rows():
    tables = _preset("baseline_fp16", {"overrides": {"t_b": {"compression": {"kind": "int8"}}}})
    configs = build_table_configs(tables, FEATURES, ROWS)
    ebc = build_collection(configs, torch.device("cpu"))
    assert isinstance(ebc, CompressedEmbeddingBagCollection)
    state = ebc.state_dict()
    assert state["embedding_bags.t_a.weight"].dtype == torch.float16  # the stock state-dict key and dtype
    assert "embedding_bags.t_b.int8_rows" in state
