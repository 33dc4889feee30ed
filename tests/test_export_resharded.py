"""A run trained on 2 ranks row-wise and a 1-rank run resharded from it (``trainer.init_from`` with
``trainer.max_steps=0``: its checkpoint holds the loaded state, no step taken) export the same model: the same
manifest (tables, tiers, shapes, slot maps, every file's bytes), the same dequantised row for every id and
the same scores, exactly."""

import json
import os
import sys

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.test_export import _batch, _run
from tests.training.small_job import SMALL

# 50, 30 and 10 rows: sizes where rounding each shard's tier fractions on its own gave the 2-rank run tiers the
# 1-rank table had no room for (the rows that did not fit were re-tiered on load and the exports differed)
CARDINALITIES = "data.synthetic.cardinalities=[2000,500,100,50,30,10]"
JOB = [o for o in SMALL if not o.startswith("data.synthetic.cardinalities=")] + [
    CARDINALITIES, "trainer.num_threads=1",
    # a few steps with re-tiering, so that each shard's pools hold its rows in the order training left them
    "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=4",
]
KINDS = {
    "shark_3tier": ["tables=shark_3tier", "tables.compression.mixed_precision.retier_every=2"],
    "int8": ["tables=int8"],
    # t_f00 as cores, the rest stock fp32; 10 x 10 rows a first-core slice, so each rank owns 10 of its 20 slices
    "tt": ["tables=tt", "tables.compression.tensor_train.min_rows=1000",
           "tables.compression.tensor_train.row_factors=[20,10,10]"],
}
DEFAULT_SUITE = {"shark_3tier"}  # the others: make test-slow


def _torchrun(*argv):
    return _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """``kind -> (2-rank run, 1-rank run, their exports)``, each built once for the module."""
    root = tmp_path_factory.mktemp("resharded")
    done = {}

    def build(kind):
        if kind not in done:
            two, one = root / f"{kind}_2rank", root / f"{kind}_1rank"
            _torchrun("train.py", f"hydra.run.dir={two}", *JOB, *KINDS[kind], "planner.sharding_types=[row_wise]")
            _run("train.py", f"hydra.run.dir={one}", *JOB, *KINDS[kind], "trainer.max_steps=0",
                 f"trainer.init_from={two}")
            for run in (two, one):
                _run("-m", "torchrec_shark.export", f"run_dir={run}", f"out={run}.export",
                     f"hydra.run.dir={run}.export_job")
            done[kind] = (two, one, f"{two}.export", f"{one}.export")
        return done[kind]

    return build


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def _every_row(model, manifest):
    """Each feature's pooled embedding of every id of its table on its own (a bag of one id: its row as served)."""
    rows = {f: t["num_embeddings"] for t in manifest["tables"] for f in t["features"]}
    names = manifest["model"]["feature_names"]
    batch = max(rows.values())
    lengths = torch.cat([(torch.arange(batch) < rows[f]).long() for f in names])
    values = torch.cat([torch.arange(rows[f]) for f in names])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=names, values=values, lengths=lengths)
    with torch.no_grad():
        pooled = model.pooled(kjt)
    return {f: p[: rows[f]] for f, p in zip(names, pooled)}


@pytest.mark.parametrize("kind", [k if k in DEFAULT_SUITE else pytest.param(k, marks=pytest.mark.slow)
                                  for k in KINDS])
def test_a_two_rank_row_wise_export_equals_the_one_rank_export_resharded_from_it(resharded, kind):
    from torchrec_shark import serving

    two, one, two_export, one_export = resharded(kind)
    m2, m1 = _metrics(two), _metrics(one)
    assert m2["world_size"] == 2 and m1["world_size"] == 1 and m1["steps"] == 0
    row_wise = {n for n, t in m2["tables"].items() if t["sharding_type"] == "row_wise" and t["ranks"] == [0, 1]}
    assert row_wise == set(m2["tables"]), m2["tables"]

    a, b = serving.read_manifest(two_export), serving.read_manifest(one_export)
    assert a["source"]["world_size"] == 2 and b["source"]["world_size"] == 1
    # The export is a function of the model alone: a canonical layout, so every file is byte for byte the same.
    assert a["tables"] == b["tables"]
    assert a["model"] == b["model"] and a["dense"] == b["dense"] and a["data"] == b["data"]
    assert a["files"] == b["files"]

    served2, served1 = serving.load(two_export), serving.load(one_export)
    rows2, rows1 = _every_row(served2, a), _every_row(served1, b)
    assert rows2.keys() == rows1.keys() == set(a["model"]["feature_names"])
    for f in rows2:
        assert torch.equal(rows2[f], rows1[f]), f
        assert rows2[f].abs().sum(1).gt(0).all(), f  # every row was read, none left empty
    dense, kjt = _batch(a, batch=256)
    with torch.no_grad():
        scores2, scores1 = served2(dense, kjt), served1(dense, kjt)
    assert torch.equal(scores2, scores1)
    assert scores2.std() > 0  # a trained model, not a constant


def test_the_resharded_run_is_the_loaded_state_kept_as_step_zero(resharded):
    """``trainer.max_steps=0`` with ``trainer.init_from``: no step, the warm-started state evaluated and saved."""
    from torchrec_shark.distributed.state_readers import CheckpointStateReader

    two, one, _, _ = resharded("shark_3tier")
    m2, m1 = _metrics(two), _metrics(one)
    assert [h["step"] for h in m1["history"]] == [0] and m1["history"][0]["train_loss"] is None
    assert m1["best"]["step"] == 0 and m1["best"]["checkpoint"] == "checkpoints/step_00000000"
    assert sorted(os.listdir(one / "checkpoints")) == ["best", "latest", "step_00000000"]
    # the model that evaluates as the source's (one rank's reduction order against two ranks')
    assert m1["val_auc"] == pytest.approx(m2["val_auc"], abs=1e-6)
    assert m1["val_logloss"] == pytest.approx(m2["val_logloss"], abs=1e-6)
    # The same rows, stored otherwise: one shard's pools in place of two. What the export has to undo.
    key = "model.model.embedding_bag_collection.embedding_bags.t_f00."
    saved2 = CheckpointStateReader(str(two / "checkpoints" / "step_00000004"), key)
    saved1 = CheckpointStateReader(str(one / "checkpoints" / "step_00000000"), key)
    assert saved2.read("shards").shape[0] == 2 and saved1.read("shards").shape[0] == 1
    assert not torch.equal(saved2.read("row_slot"), saved1.read("row_slot"))
    warm = json.loads((one / "warm_start.json").read_text())
    assert warm["fresh_tables"] == [] and warm["data_offset_batches"] == 4
