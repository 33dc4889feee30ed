"""The table-count scaling benchmark: the wide setup has the same rows and ids per step in more tables."""

from torchrec_shark.bench import table_scaling
from torchrec_shark.bench import tables as bt


def test_split_keeps_rows_and_gives_every_table_its_feature():
    shapes = bt.table_configs(3, 10, 1000, 1.0, 8)
    wide = table_scaling.split_shapes(shapes, 4)
    assert len(wide) == 12
    assert sum(s.num_embeddings for s in wide) == sum(s.num_embeddings for s in shapes)
    assert len({s.feature_names[0] for s in wide}) == 12


def test_both_setups_of_every_kind_are_timed():
    shapes = bt.table_configs(3, 10, 200, 1.0, 8)
    rows = table_scaling.measure(["fp32", "torch_embedding_bag"], shapes, 2, 64, iters=2, warmup=1, rounds=2)
    assert [r["kind"] for r in rows] == ["fp32", "torch_embedding_bag"]
    for r in rows:
        assert (r["tables"], r["wide_tables"]) == (3, 6)
        assert r["ms_per_step"] > 0 and r["wide_ms_per_step"] > 0
        assert r["ratio"] == r["wide_ms_per_step"] / r["ms_per_step"]
