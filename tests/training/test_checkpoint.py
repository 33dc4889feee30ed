import os

import pytest
import torch
from torch import nn

from torchrec_shark.training import checkpoint as ckpt


class Holder(nn.Module):
    def __init__(self, names, width=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.tables = nn.ParameterDict({n: nn.Parameter(torch.randn(5, width)) for n in names})


def test_save_then_latest_then_load_round_trip(tmp_path):
    src = Holder(["a", "b"], seed=0)
    ckpt.save_checkpoint(str(tmp_path), 3, {"model": src}, meta={"step": 3})
    dst = Holder(["a", "b"], seed=1)
    path = ckpt.latest_checkpoint(str(tmp_path))
    assert path.endswith("step_00000003")
    assert ckpt.load_checkpoint(path, {"model": dst})["step"] == 3
    for n in ("a", "b"):
        torch.testing.assert_close(dst.tables[n], src.tables[n])


def test_half_written_checkpoint_is_never_returned(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 1, {"model": Holder(["a"])}, meta={"step": 1})
    root = tmp_path / ckpt.CHECKPOINT_DIR
    # A crash mid-write leaves a hidden temporary dir, and a dir without meta.json.
    (root / ".tmp-step_00000002").mkdir()
    (root / ".tmp-step_00000002" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step_00000003").mkdir()
    (root / ckpt.LATEST).write_text("step_00000003")
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000001")


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(str(tmp_path), step, {"model": Holder(["a"])}, meta={"step": step}, keep=2)
    names = sorted(n for n in os.listdir(tmp_path / ckpt.CHECKPOINT_DIR) if n.startswith("step_"))
    assert names == ["step_00000002", "step_00000003"]


def test_run_dir_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.require_checkpoint(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.require_checkpoint(str(tmp_path / "nope"))


def test_warm_start_matches_by_name_and_skips_absent_or_reshaped(tmp_path):
    src = Holder(["a", "b", "c"], seed=0)
    ckpt.save_checkpoint(str(tmp_path), 7, {"model": src}, meta={"step": 7})
    dst = Holder(["a", "d"], seed=1)
    dst.tables["c"] = nn.Parameter(torch.zeros(5, 8))  # same name, other width: stays fresh
    before_d = dst.tables["d"].detach().clone()
    report = ckpt.warm_start(str(tmp_path), dst)
    torch.testing.assert_close(dst.tables["a"], src.tables["a"])
    torch.testing.assert_close(dst.tables["d"], before_d)
    assert torch.all(dst.tables["c"] == 0)
    assert report["loaded"] == ["tables.a"] and report["skipped"] == ["tables.c", "tables.d"]


def _adam(module):
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    return KeyedOptimizerWrapper(dict(module.named_parameters()), lambda ps: torch.optim.Adam(ps, lr=0.1))


def _train(module, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum((p * torch.randn(p.shape, generator=gen)).sum() ** 2 for _, p in sorted(module.named_parameters()))
        loss.backward()
        opt.step()


def test_warm_start_optimizer_continues_the_source_moments(tmp_path):
    src = Holder(["a", "b"], seed=0)
    src_opt = _adam(src)
    _train(src, src_opt, 3, seed=5)
    ckpt.save_checkpoint(str(tmp_path), 3, {"model": src, "optim": src_opt}, meta={"step": 3})
    dst = Holder(["a", "b"], seed=1)
    dst.tables["b"] = nn.Parameter(torch.zeros(5, 8))  # reshaped: its moments must not load
    dst_opt = _adam(dst)
    report = ckpt.warm_start(str(tmp_path), dst)
    loaded = ckpt.warm_start_optimizer(str(tmp_path), dst_opt, report["loaded"])
    assert loaded == ["tables.a/exp_avg", "tables.a/exp_avg_sq", "tables.a/step"]
    state = dst_opt.state_dict()["state"]
    torch.testing.assert_close(state["tables.a"]["exp_avg"], src_opt.state_dict()["state"]["tables.a"]["exp_avg"])
    assert torch.all(state["tables.b"]["exp_avg"] == 0)
    # A continued run takes the same next step as the uninterrupted source on the kept table; a fresh
    # Adam would not (its first step is lr-sized whatever the gradient).
    with torch.no_grad():
        dst.tables["b"].zero_()
    grad = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    for module, opt in ((src, src_opt), (dst, dst_opt)):
        opt.zero_grad()
        (module.tables["a"] * grad).sum().backward()
        opt.step()
    torch.testing.assert_close(dst.tables["a"], src.tables["a"])


def test_warm_start_optimizer_narrows_the_state_of_narrowed_weights(tmp_path):
    src = Holder(["a", "c"], seed=0)
    src_opt = _adam(src)
    _train(src, src_opt, 3, seed=5)
    ckpt.save_checkpoint(str(tmp_path), 3, {"model": src, "optim": src_opt}, meta={"step": 3})
    dst = Holder(["a"], seed=1)
    dst.tables["c"] = nn.Parameter(torch.zeros(5, 2))
    dst_opt = _adam(dst)
    report = ckpt.warm_start(str(tmp_path), dst, {"tables.c": [1, 3]})
    loaded = ckpt.warm_start_optimizer(str(tmp_path), dst_opt, report["loaded"] + report["narrowed"],
                                       report["narrowed_columns"])
    assert "tables.c/exp_avg" in loaded and "tables.c/exp_avg_sq" in loaded
    torch.testing.assert_close(dst.tables["c"], src.tables["c"][:, [1, 3]])
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(dst_opt.state_dict()["state"]["tables.c"][name],
                                   src_opt.state_dict()["state"]["tables.c"][name][:, [1, 3]])
