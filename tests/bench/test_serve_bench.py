"""The serving benchmark end to end on tiny runs: trains, exports and scores each preset, then reports the
exports' AUC against the runs', their sizes and their samples/s (whole model and lookups alone) against the
exported stock fp32 model and TorchRec's quantised collection of the same precision."""

import json

import pytest

from tests.test_export import TINY
from torchrec_shark.bench import serve

pytestmark = pytest.mark.slow  # three tiny runs trained, exported and scored: minutes


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    train = [t for t in TINY if not t.startswith(("trainer.max_steps", "trainer.eval_every", "trainer.checkpoint"))]
    return out, serve.main(["--presets", "baseline,int8,shark_3tier", "--steps", "20", "--batch-sizes", "256",
                            "--rounds", "1", "--iters", "1", "--out", str(out), "--train",
                            *train, "tables.compression.mixed_precision.retier_every=5"])


def test_exports_score_the_runs_auc_at_the_runs_size(report):
    out, r = report
    assert [a["preset"] for a in r["auc"]] == ["baseline", "int8", "shark_3tier"]
    for a in r["auc"]:
        assert abs(a["difference"]) <= 1e-4, a
    for s in r["sizes"]:
        # the tables as trained less their priorities (training state; the slot map stays: it serves); the
        # manifest's few kB are left out here, where they would be several percent of these tiny tables
        assert 0.98 <= s["export_table_bytes"] / (s["embedding_bytes"] - s["priority_bytes"]) <= 1.0, s
        assert s["export_bytes"] > s["export_table_bytes"] + s["dense_bytes"]
    shark = next(s for s in r["sizes"] if s["preset"] == "shark_3tier")
    assert shark["priority_bytes"] > 0 and shark["reference_bytes"] < shark["embedding_bytes"] + shark["dense_bytes"]
    assert json.loads((out / "serve.json").read_text())["command"] == r["command"]
    assert "| 256 | lookups | shark_3tier |" in (out / "serve.md").read_text()


def test_every_export_is_timed_against_stock_fp32_and_torchrec_of_its_precision(report):
    _, r = report
    rows = {(s["part"], s["model"]): s for s in r["speed"]}
    for part in ("model", "lookups"):
        assert {m for p, m in rows if p == part} == {"baseline", "int8", "shark_3tier", "torchrec_int8"}
        assert rows[(part, "baseline")]["vs_stock_fp32"]["median"] == pytest.approx(1.0)
        assert rows[(part, "int8")]["vs_torchrec"]["model"] == "torchrec_int8"
        assert "vs_torchrec" not in rows[(part, "shark_3tier")]  # no TorchRec collection serves per-row tiers
        assert all(s["samples_per_s"]["median"] > 0 for (p, _), s in rows.items() if p == part)
