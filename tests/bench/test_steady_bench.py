"""The steady-state benchmark's ratios, on made-up speed histories (the jobs themselves are not run)."""

import pytest

from torchrec_shark.bench import steady


def _history(speeds, log_every=10):
    return [{"step": (i + 1) * log_every, "samples_per_s": s} for i, s in enumerate(speeds)]


def test_ratios_of_one_pair(monkeypatch):
    # 12 intervals of 10 steps; a checkpoint every 30. The ckpt job runs 0.9x its control throughout,
    # and 0.9 * 0.8 after step 60: normalised must see only the 0.8.
    control = [50.0] + [100.0] * 11
    ckpt = [40.0] + [90.0] * 5 + [72.0] * 6
    calls = []

    def fake_job(run_dir, kind, layout, steps, every, *rest):
        calls.append(every)
        return {"speed_history": _history(ckpt if every < steps else control)}

    monkeypatch.setattr(steady, "_job", fake_job)
    row = steady.measure("baseline", "1", 120, 30, 10, [], [], 60, repeats=2)
    assert calls == [30, 120, 120, 30]  # the second pair runs the control first
    assert row["before_first"] == 90.0  # the warm-up interval is left out
    assert row["after_last"] == 72.0
    assert row["after_over_before"] == pytest.approx(0.8)
    assert row["last_third_over_control"] == pytest.approx(0.72)
    assert row["normalised"] == pytest.approx(0.8)
    assert len(row["pairs"]) == 2 and row["pairs"][1]["control_first"]
