"""Planner benchmark on the Criteo 1TB tables scaled down 1000x (caps scaled with them): compressed kinds
fit where stock fp32 does not, the plan's shards add up to each kind's total, TT is the smallest, the
kinds mirror the ``tables=`` config groups, and the real-scale command plans on meta."""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from torchrec_shark.bench import plan as bp
from torchrec_shark.config import TablesConfig
from torchrec_shark.training.table_factory import build_table_configs

SCALE = 1000
ROWS = [max(1, n // SCALE) for n in bp.CRITEO_1TB_ROWS]
TT_MIN_ROWS = 100_000 // SCALE
BATCH = 32  # per rank: keeps the lookup buffers small next to these tables
CONF_TABLES = Path(__file__).resolve().parents[2] / "conf" / "tables"


def _totals():
    return {k: bp.kind_total_bytes(bp.table_configs(k, ROWS, tt_min_rows=TT_MIN_ROWS)) for k in bp.KINDS}


def _plan(kind, topology, sharding_types=None):
    return bp.plan_kind(kind, topology, BATCH, ROWS, tt_min_rows=TT_MIN_ROWS, sharding_types=sharding_types)


@pytest.fixture(scope="module")
def totals():
    return _totals()


@pytest.fixture(scope="module")
def one_small_gpu(totals):
    # Usable after the planner's 15% reserve: 0.51x the fp32 tables (fp32 cannot fit, the compressed kinds can).
    return bp.SimTopology("small1", "cuda", 1, 0.6 * totals["fp32"] / bp.GIB)


def test_kind_totals_order_and_fp32_total_is_rows_times_dim(totals):
    fp32_tables = sum(ROWS) * 128 * 4
    assert totals["fp32"] == fp32_tables + sum(ROWS) * bp.MOMENTUM_BYTES_PER_ROW
    assert totals["tt"] < totals["shark"] < totals["int8"] < totals["fp16"] < totals["fp32"]  # shark: int4 bulk
    assert totals["fp16"] == pytest.approx(totals["fp32"] / 2, rel=0.02)


def test_compressed_kinds_fit_where_stock_fp32_does_not(one_small_gpu, totals):
    results = {k: _plan(k, one_small_gpu) for k in bp.KINDS}
    assert not results["fp32"].fits and results["fp32"].error == "insufficient_storage"
    for kind in ("shark", "int8", "tt"):
        r = results[kind]
        assert r.fits, (kind, r.error)
        # One rank holds everything: the plan's table bytes are the kind's total, and its estimate adds buffers.
        assert r.table_bytes == [totals[kind]]
        assert r.plan_bytes[0] >= 0.95 * totals[kind]
    assert max(results["tt"].plan_bytes) < min(max(results[k].plan_bytes) for k in ("shark", "int8"))


def test_per_rank_bytes_add_up_to_the_totals_on_four_ranks(one_small_gpu, totals):
    four = bp.SimTopology("small4", "cuda", 4, one_small_gpu.memory_gib)
    results = [_plan(k, four) for k in bp.KINDS]
    for r in results:
        assert r.fits, (r.kind, r.error)
        assert len(r.plan_bytes) == len(r.table_bytes) == 4
        assert sum(r.sharding_types.values()) == len(ROWS)
        assert max(r.plan_bytes) <= 0.85 * four.memory_gib * bp.GIB
        # Column-wise stock shards each keep a momentum per row; TT shards replicate their small cores.
        assert sum(r.table_bytes) == pytest.approx(totals[r.kind], rel=0.03), r.kind
    by_kind = {r.kind: r for r in results}
    assert max(by_kind["tt"].table_bytes) == min(max(r.table_bytes) for r in results)
    assert bp.smallest_fit(results, "fp32", "cuda") == four


def test_row_wise_plans_split_every_row_store_evenly(one_small_gpu, totals):
    four = bp.SimTopology("small4", "cuda", 4, one_small_gpu.memory_gib)
    for kind in ("fp32", "fp16", "shark", "int8"):
        r = _plan(kind, four, ["row_wise"])
        assert r.fits and r.sharding_types == {"row_wise": len(ROWS)}, (kind, r.error, r.sharding_types)
        # Per-shard tier budgets round per shard; the pieces still add up to the table.
        assert sum(r.table_bytes) == pytest.approx(totals[kind], rel=1e-3), kind
        assert max(r.table_bytes) <= 1.02 * totals[kind] / 4, (kind, r.table_bytes)
    tt = _plan("tt", four, ["row_wise"])
    assert tt.fits
    # Misaligned TT tables are held to table_wise; row-wise TT shards replicate the later cores.
    assert tt.sharding_types.get("table_wise", 0) == tt.table_wise_only
    assert sum(tt.table_bytes) >= totals["tt"]


def test_row_wise_tt_shards_replicate_the_later_cores():
    # 64000 = 40^3 rows: first-core slices of 40 * 40 rows, so 4 row-wise shards of 16000 rows align.
    rows = [64000, 50]
    configs = bp.table_configs("tt", rows, tt_min_rows=TT_MIN_ROWS)
    assert configs[0].compression is not None and configs[1].compression is None
    four = bp.SimTopology("tiny4", "cuda", 4, 1.0)
    r = bp.plan_kind("tt", four, BATCH, rows, tt_min_rows=TT_MIN_ROWS, sharding_types=["row_wise"])
    assert r.fits and r.sharding_types == {"row_wise": 2} and r.table_wise_only == 0
    total = bp.kind_total_bytes(configs)
    # Every shard holds a quarter of the first core but all of the others (and their pending gradients).
    assert sum(r.table_bytes) > 2 * total
    assert min(r.table_bytes) > total / 4


def test_smallest_fit_prefers_fewer_ranks(one_small_gpu, totals):
    two = bp.SimTopology("small2", "cuda", 2, one_small_gpu.memory_gib)
    results = [_plan("int8", one_small_gpu), _plan("int8", two)]
    assert all(r.fits for r in results)
    assert bp.smallest_fit(results, "int8", "cuda") == one_small_gpu
    assert bp.smallest_fit(results, "int8", "cpu") is None


@pytest.mark.parametrize("kind,group", [("shark", "shark"), ("int8", "int8"), ("tt", "tt"), ("fp32", "baseline")])
def test_kinds_mirror_the_tables_config_groups(kind, group):
    cfg = OmegaConf.merge(OmegaConf.structured(TablesConfig), OmegaConf.load(CONF_TABLES / f"{group}.yaml"))
    cfg.embedding_dim = 128
    features = [f"cat_{i}" for i in range(len(bp.CRITEO_1TB_ROWS))]
    expected = build_table_configs(cfg, features, list(bp.CRITEO_1TB_ROWS))
    got = bp.table_configs(kind)
    assert [(c.name, c.num_embeddings, c.embedding_dim, c.compression) for c in got] == [
        (c.name, c.num_embeddings, c.embedding_dim, c.compression) for c in expected
    ]


def test_real_scale_command_plans_on_meta(capsys):
    results = bp.main(["--kinds", "fp32,shark", "--topologies", "gpu1"])
    out = capsys.readouterr().out
    by_kind = {r.kind: r for r in results}
    # 104.5 GB of fp32 tables cannot fit one 80 GiB GPU; shark's 18.8 GB can.
    assert not by_kind["fp32"].fits and by_kind["shark"].fits
    assert "stock fp32 tables 104.54 GB" in out
    assert "PlannerError: insufficient_storage" in out
    assert re.search(r"shark +GPU: gpu1", out) and re.search(r"fp32 +GPU: none of those planned", out)
    assert "peak RSS" in out


def test_unknown_kind_is_rejected():
    with pytest.raises(SystemExit):
        bp.main(["--kinds", "fp8"])
