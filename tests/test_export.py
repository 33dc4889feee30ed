"""Export a trained run, load it in a fresh process and score with it: the run's own evaluation AUC again
(mixed precision: every row-store path, slot map included; tensor train: cores);
the loaded model scripts; a damaged export fails to load naming the file."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.training.small_job import ROOT

TINY = [
    "data.synthetic.cardinalities=[2000,500,100,50,20,10]", "data.synthetic.num_noise_fields=2",
    "data.synthetic.multi_hot_fields=[1]", "data.synthetic.num_train_samples=20000",
    "data.synthetic.num_val_samples=2048", "trainer.batch_size=256", "trainer.eval_batches=8",
    "trainer.progress=false", "tables.embedding_dim=16", "model.interaction_dim=16",
    "trainer.max_steps=30", "trainer.eval_every=30", "trainer.checkpoint_every=30",
]
KINDS = {
    "shark_3tier": ["tables=shark_3tier", "tables.compression.mixed_precision.retier_every=10"],  # three tiers
    "tt": ["tables=tt", "tables.compression.tensor_train.min_rows=1000"],  # t_f00 as cores, the rest stock
}


def _run(*argv, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for kind, overrides in KINDS.items():
        run = root / kind
        _run("train.py", f"hydra.run.dir={run}", *TINY, *overrides)
        _run("-m", "torchrec_shark.export", f"run_dir={run}", f"out={root / (kind + '.export')}",
             f"hydra.run.dir={root / (kind + '.export_job')}")
        out[kind] = (run, root / (kind + ".export"))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_score_in_a_fresh_process_gives_the_runs_auc(exports, kind, tmp_path):
    run, export = exports[kind]
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((export / "manifest.json").read_text())
    assert {t["kind"] for t in manifest["tables"]} >= {metrics["tables"]["t_f00"]["kind"]}
    _run("-m", "torchrec_shark.score", f"model={export}", f"hydra.run.dir={tmp_path / 'score'}")
    score = json.loads((tmp_path / "score" / "score.json").read_text())
    assert score["val_auc"] == pytest.approx(metrics["val_auc"], abs=1e-4)
    assert score["val_logloss"] == pytest.approx(metrics["val_logloss"], abs=1e-4)
    # no training state: no optimizer accumulators or priorities among the exported tensors
    names = {n for t in manifest["tables"] for n in t.get("tensors", {})}
    assert not any("momentum" in n or "priority" in n for n in names), names


def _batch(manifest, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = {f: t["num_embeddings"] for t in manifest["tables"] for f in t["features"]}
    names = manifest["model"]["feature_names"]
    lengths = torch.randint(0, 3, (len(names) * batch,), generator=g)
    values = torch.cat([torch.randint(0, rows[f], (int(lengths[i * batch:(i + 1) * batch].sum()),), generator=g)
                        for i, f in enumerate(names)])
    dense = torch.randn(batch, manifest["model"]["dense_in_features"], generator=g)
    return dense, KeyedJaggedTensor.from_lengths_sync(keys=names, values=values, lengths=lengths)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_loaded_model_scripts_and_scores_the_same(exports, kind):
    from torchrec_shark import serving

    _, export = exports[kind]
    model = serving.load(str(export))
    dense, kjt = _batch(serving.read_manifest(str(export)))
    with torch.no_grad():
        eager = model(dense, kjt)
        scripted = serving.script(model)(dense, kjt)
    assert eager.shape == (64,) and bool(((eager > 0) & (eager < 1)).all())
    torch.testing.assert_close(scripted, eager, rtol=0, atol=1e-6)


def test_a_damaged_export_fails_naming_the_file(exports, tmp_path):
    from torchrec_shark import serving

    _, export = exports["shark_3tier"]
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(export), str(damaged)], check=True)
    manifest = json.loads((damaged / "manifest.json").read_text())
    name = next(n for n in manifest["files"] if n.endswith(".bin"))
    path = damaged / name
    path.write_bytes(path.read_bytes()[:-4])  # truncated
    with pytest.raises(serving.ExportError, match=name):
        serving.load(str(damaged))
    proc = _run("-m", "torchrec_shark.score", f"model={damaged}", f"hydra.run.dir={tmp_path / 'score'}", check=False)
    assert proc.returncode != 0 and name in proc.stdout + proc.stderr
    (damaged / "manifest.json").unlink()  # an interrupted export: no manifest
    with pytest.raises(serving.ExportError, match="not a complete export"):
        serving.load(str(damaged))
