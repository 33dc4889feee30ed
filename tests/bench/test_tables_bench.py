"""Table benchmark on tiny tables: every kind runs and is reported, the ratio reference is named
(and falls back to the plain-torch kind when FBGEMM's cannot run), the plain-torch reference
trains exactly like FBGEMM's fused row-wise Adagrad, and the module runs with torch alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchrec_shark.bench import tables as tb

TINY = ["--tables", "3", "--min-rows", "50", "--max-rows", "2000", "--dim", "8", "--batch", "64",
        "--iters", "2", "--rounds", "2", "--warmup", "1", "--num-batches", "2"]


def _check_results(report, kinds):
    by_kind = {r["kind"]: r for r in report["results"]}
    assert set(kinds) <= set(by_kind), f"missing kinds: {set(kinds) - set(by_kind)}"
    for r in by_kind.values():
        assert r["step_ms"] > 0 and r["samples_per_s"] > 0 and r["timed_steps"] == 2, r
        assert r["bytes"] > 0 and r["fp32_bytes"] > 0
    ref = report["reference"]["kind"]
    assert by_kind[ref]["throughput_vs_ref"] == pytest.approx(1.0)
    rounds = report["args"]["rounds"]
    for r in by_kind.values():  # each ratio also taken round by round, its spread printed
        assert len(r["vs_ref_rounds"]) == rounds
        assert r["vs_ref_min"] <= r["vs_ref_median"] <= r["vs_ref_max"]
        assert r["cpu_vs_ref_min"] <= r["cpu_vs_ref_median"] <= r["cpu_vs_ref_max"]
    assert by_kind[ref]["vs_ref_rounds"] == [1.0] * rounds
    return by_kind


def test_every_kind_runs_and_the_reference_is_named(tmp_path, capsys):
    kinds = [k.name for k in tb.KINDS]
    path = tmp_path / "out.json"
    tb.main(TINY + ["--kinds", ",".join(kinds), "--json", str(path)])
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    by_kind = _check_results(report, kinds)
    assert report["unavailable"] == {}
    assert report["reference"]["kind"] == "stock_fbgemm"
    assert "reference for the 'vs ref' column: stock_fbgemm" in out
    for k in kinds:
        assert f"\n{k} " in out, f"no row for {k}"
    # the fp16/int8 kinds really store fewer bytes than the fp32 ones
    assert by_kind["torch_embedding_bag"]["bytes"] == by_kind["stock_fbgemm"]["bytes"] == by_kind["fp32"]["bytes"]
    assert by_kind["int8"]["bytes"] < by_kind["fp16"]["bytes"] < by_kind["fp32"]["bytes"]


def test_torch_reference_is_added_and_named_when_stock_is_not_run(capsys):
    report = tb.main(TINY + ["--kinds", "fp32,mixed_precision"])
    out = capsys.readouterr().out
    _check_results(report, ["fp32", "mixed_precision", "torch_embedding_bag"])
    assert report["reference"]["kind"] == "torch_embedding_bag"
    assert "stock_fbgemm was not among the kinds run" in report["reference"]["why"]
    assert "reference for the 'vs ref' column: torch_embedding_bag" in out


def test_torch_reference_trains_like_fbgemm_rowwise_adagrad():
    shapes = tb.table_configs(2, 20, 200, 1.0, 8)
    batches = tb.make_batches(shapes, 16, 2, 1.1, 0.25, 3, seed=0)  # repeated ids within and across bags
    torch.manual_seed(0)
    ref = tb.TorchEmbeddingBag(shapes, lr=0.1)
    stock = tb.KINDS[0].build(shapes, 0.1, torch.device("cpu")).ebc  # FBGEMM fused, row-wise Adagrad
    sd = stock.state_dict()
    with torch.no_grad():
        for s, w in zip(shapes, ref.weights()):
            sd[f"embedding_bags.{s.name}.weight"].copy_(w)
    init = [w.clone() for w in ref.weights()]
    g = torch.full((1, 1), 1.0 / 16)
    for b in batches:
        out = stock(b.kjt()).values()
        torch.testing.assert_close(ref(b.bags), out.detach())
        out.backward(g.expand_as(out))
        ref.step(b.bags, g)
    sd = stock.state_dict()
    for s, w, w0 in zip(shapes, ref.weights(), init):
        assert (w - w0).abs().max() > 1e-2  # the update moved the rows
        torch.testing.assert_close(w, sd[f"embedding_bags.{s.name}.weight"], rtol=1e-5, atol=1e-6)


_NO_TORCHREC = """
import sys
for name in ("torchrec", "fbgemm_gpu"):
    sys.modules[name] = None  # any import of them (or of their submodules) now fails
from torchrec_shark.bench import tables as tb
report = tb.main(sys.argv[1:])
print("REPORT", __import__("json").dumps({k: report[k] for k in ("reference", "unavailable")}))
print("KINDS", ",".join(r["kind"] for r in report["results"]))
"""


def test_runs_with_torch_alone():
    root = str(Path(__file__).resolve().parents[2])  # the checkout, importable in the child
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCHREC] + TINY + ["--kinds", "stock_fbgemm,fp32,torch_embedding_bag"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    report = json.loads(next(x for x in lines if x.startswith("REPORT "))[7:])
    assert next(x for x in lines if x.startswith("KINDS ")) == "KINDS torch_embedding_bag"
    assert set(report["unavailable"]) == {"stock_fbgemm", "fp32"}
    assert all("ImportError" in why or "ModuleNotFoundError" in why for why in report["unavailable"].values())
    assert report["reference"]["kind"] == "torch_embedding_bag"
    assert "stock_fbgemm is unavailable on cpu" in report["reference"]["why"]
    assert "stock_fbgemm: unavailable on cpu" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_builds_every_kind_on_the_device(tmp_path):
    kinds = [k.name for k in tb.KINDS if not k.stock]
    report = tb.main(TINY + ["--device", "cuda", "--kinds", ",".join(kinds)])
    _check_results(report, kinds)
