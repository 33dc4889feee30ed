"""The deep-tier stage's tables config: the preset for every table, except those a narrow-table preset stores
in fewer bytes (per-row scales and metadata outweigh the codes of a narrow or small table)."""

from omegaconf import OmegaConf

from torchrec_shark.pipeline.run import _table_bytes, compressed_tables_config


def test_narrow_and_small_tables_take_the_preset_that_stores_them_in_fewer_bytes(tmp_path):
    source = tmp_path / "searched.yaml"
    OmegaConf.save({"name": "searched", "embedding_dim": 32, "pooling": "sum", "compression": {"kind": "none"},
                    "init_columns": {"t_wide": [0, 1]},
                    "tables": {"t_wide": {"features": ["a"], "num_embeddings": 1_000_000, "embedding_dim": 32},
                               "t_narrow": {"features": ["b"], "num_embeddings": 1_000_000, "embedding_dim": 4},
                               "t_small": {"features": ["c"], "num_embeddings": 1000, "embedding_dim": 32}}},
                   source)
    out = compressed_tables_config(str(source), str(tmp_path / "out"), "deep", "shark")
    doc = OmegaConf.load(tmp_path / "out" / "tables" / "deep.yaml")
    assert doc.name == "deep" and doc.compression.kind == "mixed_precision" and doc.init_columns == {}
    assert doc.tables.t_wide.get("compression") is None  # the preset's, as every table without its own
    assert doc.tables.t_narrow.compression.kind == "int8" and doc.tables.t_small.compression.kind == "int8"
    assert _table_bytes("int8", 1_000_000, 4) < _table_bytes("shark", 1_000_000, 4)
    assert _table_bytes("shark", 1_000_000, 32) < _table_bytes("int8", 1_000_000, 32)
    assert out == str(tmp_path / "out")
    # the narrow preset itself: nothing to fall back to
    compressed_tables_config(str(source), str(tmp_path / "int8"), "deep", "int8")
    doc = OmegaConf.load(tmp_path / "int8" / "tables" / "deep.yaml")
    assert all(t.get("compression") is None for t in doc.tables.values()) and doc.compression.kind == "int8"
