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

    def fake_histories(setup, kind, layout, control_first):
        calls.append(control_first)
        return {"ckpt": _history(ckpt), "control": _history(control)}

    monkeypatch.setattr(steady, "_histories", fake_histories)
    setup = steady.Setup(steps=120, every=30, log_every=10, data=[], extra=[], timeout=60)
    row = steady.measure(setup, "baseline", "1", repeats=2)
    assert calls == [False, True]  # the second pair starts with the control
    assert row["before_first"] == 90.0  # the warm-up interval is left out
    assert row["after_last"] == 72.0
    assert row["after_over_before"] == pytest.approx(0.8)
    assert row["last_third_over_control"] == pytest.approx(0.72)
    assert row["normalised"] == pytest.approx(0.8)
    assert len(row["pairs"]) == 2 and row["pairs"][1]["control_first"]
