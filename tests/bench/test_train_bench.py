"""The training-speed benchmark: its commands, its ratios over repeats, and one tiny real pair of jobs."""

import pytest

from torchrec_shark.bench import train


def _history(speeds, log_every=10):
    return [{"step": (i + 1) * log_every, "samples_per_s": s} for i, s in enumerate(speeds)]


def test_commands_take_turns_and_shard_as_asked():
    one = train.command("/r", "shark", "1", "kind", "/g", True, 40, 10, ["data.x=1"])
    assert one[1:7] == ["-m", "torchrec_shark.bench.lockstep", "--gate", "/g", "--role", "kind"]
    assert "--first" in one and "tables=shark" in one and "trainer.max_steps=40" in one and "data.x=1" in one
    assert "trainer.eval_every=40" in one and "trainer.checkpoint_every=40" in one  # nothing mid-run
    rw = train.command("/r", "baseline", "2rw", "ref", "/g", False, 40, 10, [])
    assert rw[0].endswith("torchrun") and "--nproc_per_node=2" in rw and "--first" not in rw
    assert rw[-1] == "planner.sharding_types=[row_wise]" and "--other" in rw and rw[rw.index("--other") + 1] == "kind"


def test_reference_env_is_set_for_the_reference_job_alone(tmp_path):
    ref = train.command("/r", "int8", "1", "ref", "/g", True, 40, 10, [], ["TORCHREC_SHARK_HUGE_PAGES=0", "B=2"])
    assert ref[:3] == ["env", "TORCHREC_SHARK_HUGE_PAGES=0", "B=2"] and "tables=int8" in ref
    assert train.command("/r", "int8", "1", "kind", "/g", False, 40, 10, [])[0] != "env"
    with pytest.raises(SystemExit):
        train.main(["--reference-env", "NOVALUE"])


def test_reference_checkout_runs_the_reference_jobs_from_there(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train, "measure", lambda *args: seen.append(args[-1]) or {
        "samples_per_s": 1.0, "reference_samples_per_s": 1.0, "ratio": 1.0, "ratio_min": 1.0, "ratio_max": 1.0})
    with pytest.raises(SystemExit):  # not a checkout
        train.main(["--kinds", "shark", "--reference-checkout", str(tmp_path)])
    (tmp_path / "train.py").write_text("")
    train.main(["--kinds", "shark", "--reference-checkout", str(tmp_path), "--reference-env", "A=1"])
    assert seen == [["-C", str(tmp_path), f"PYTHONPATH={tmp_path}", "A=1"]]
    ref = train.command("/r", "shark", "1", "ref", "/g", True, 40, 10, [], seen[0])
    assert ref[:5] == ["env", "-C", str(tmp_path), f"PYTHONPATH={tmp_path}", "A=1"]


def test_ratio_is_the_median_over_pairs_with_its_spread(monkeypatch):
    # the kind runs at 0.8x, 0.9x and 1.1x of the reference in three pairs; the warm-up interval is left out
    runs = iter([0.8, 0.9, 1.1])
    firsts = []

    envs = []

    def fake_pair(kind, reference, layout, steps, log_every, extra, reference_first, timeout, reference_env=()):
        firsts.append(reference_first)
        envs.append(reference_env)
        r = next(runs)
        kind_h, ref_h = _history([1.0] + [100.0 * r] * 5), _history([5.0] + [100.0] * 5)
        speeds = train.interval_speed(kind_h, 10), train.interval_speed(ref_h, 10)
        return {"samples_per_s": speeds[0], "reference_samples_per_s": speeds[1], "ratio": speeds[0] / speeds[1]}

    monkeypatch.setattr(train, "measure_pair", fake_pair)
    row = train.measure("shark", "baseline", "1", 60, 10, [], 3, 60, ["A=1"])
    assert firsts == [False, True, False]  # the reference goes first in every other pair
    assert envs == [["A=1"]] * 3
    assert row["ratio"] == pytest.approx(0.9)
    assert (row["ratio_min"], row["ratio_max"]) == (pytest.approx(0.8), pytest.approx(1.1))
    assert row["reference_samples_per_s"] == pytest.approx(100.0)


@pytest.mark.slow
def test_one_tiny_pair_runs_and_reports_a_ratio(tmp_path, capsys):
    rows = train.main(["--kinds", "int8", "--steps", "12", "--log-every", "4", "--json", str(tmp_path / "t.json"),
                       "--", "data.synthetic.cardinalities=[200,50,10]", "data.synthetic.num_noise_fields=1",
                       "data.synthetic.multi_hot_fields=[1]", "trainer.batch_size=64", "tables.embedding_dim=8",
                       "model.interaction_dim=8"])
    (row,) = rows
    assert row["ratio"] is not None and row["ratio"] > 0
    pair = row["pairs"][0]
    assert [h["step"] for h in pair["speed_history"]] == [4, 8, 12] == [h["step"] for h in pair["reference_speed_history"]]
    assert "int8" in capsys.readouterr().out
    assert (tmp_path / "t.json").exists()
