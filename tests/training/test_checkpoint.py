import logging
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


# ---------------------------------------------------------------- threads, finiteness, corruption, rotation


def _threads():
    return set(os.listdir("/proc/self/task"))


def _save_leaves_no_thread(rank, world_size, run_dir):
    # Many small tensors: DCP's plan gather is then large enough for gloo's worker thread to copy it
    # with an intra-op parallel loop, which starts an OpenMP team that lives as long as that thread.
    torch.set_num_threads(2)
    model = nn.ParameterDict({f"p{i}": nn.Parameter(torch.randn(4, 4)) for i in range(3000)})
    ptrs = {k: (v.data_ptr(), v.is_contiguous(), v.requires_grad) for k, v in model.items()}
    torch.ones(1 << 20).add_(1)  # the training thread's own team exists before the save
    before = _threads()
    ckpt.save_checkpoint(run_dir, 1, {"model": model}, meta={"step": 1})
    after = _threads()
    same = all(ptrs[k] == (v.data_ptr(), v.is_contiguous(), v.requires_grad) for k, v in model.items())
    return sorted(after - before), same


@pytest.mark.parametrize("world_size", [1, 2])
def test_save_leaves_no_thread_behind_and_tensors_in_place(tmp_path, world_size):
    from tests.dist_utils import run_ranks

    for new_threads, same in run_ranks(_save_leaves_no_thread, world_size, str(tmp_path)):
        assert new_threads == [], f"threads started by the save outlive it: {new_threads}"
        assert same


def _eval_leaves_no_thread(rank, world_size):
    from torchrec_shark.training.metrics import EvalMetrics
    from torchrec_shark.training.transient_group import transient_group

    torch.set_num_threads(2)
    torch.ones(1 << 20).add_(1)
    before = _threads()
    with transient_group() as group:
        m = EvalMetrics(torch.device("cpu"), process_group=group)
        m.update(torch.randn(100_000), (torch.rand(100_000) < 0.3).float())
        out = m.compute()
        del m
    del group
    return sorted(_threads() - before), out["samples"]


def test_metric_gather_on_a_transient_group_leaves_no_thread():
    from tests.dist_utils import run_ranks

    for new_threads, samples in run_ranks(_eval_leaves_no_thread, 2):
        assert new_threads == [] and samples == 200_000


def test_non_finite_state_is_never_saved(tmp_path):
    model = Holder(["a", "b"])
    ckpt.save_checkpoint(str(tmp_path), 1, {"model": model}, meta={"step": 1})
    with torch.no_grad():
        model.tables["b"][2, 1] = float("nan")
    with pytest.raises(ckpt.NonFiniteStateError, match=r"tables\.b.*last finite checkpoint is .*step_00000001"):
        ckpt.save_checkpoint(str(tmp_path), 2, {"model": model}, meta={"step": 2})
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000001")
    assert not (tmp_path / ckpt.CHECKPOINT_DIR / "step_00000002").exists()


def test_non_finite_optimizer_state_is_never_saved(tmp_path):
    model = Holder(["a"])
    opt = _adam(model)
    _train(model, opt, 1, seed=0)
    opt.state_dict()["state"]["tables.a"]["exp_avg_sq"].fill_(float("inf"))
    with pytest.raises(ckpt.NonFiniteStateError, match="exp_avg_sq"):
        ckpt.save_checkpoint(str(tmp_path), 1, {"model": model, "optim": opt}, meta={"step": 1})


@pytest.mark.parametrize("damage", ["distcp", "meta"])
def test_unreadable_latest_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    src = Holder(["a"], seed=0)
    ckpt.save_checkpoint(str(tmp_path), 1, {"model": src}, meta={"step": 1})
    first = src.tables["a"].detach().clone()
    with torch.no_grad():
        src.tables["a"].add_(1)
    ckpt.save_checkpoint(str(tmp_path), 2, {"model": src}, meta={"step": 2})
    newest = tmp_path / ckpt.CHECKPOINT_DIR / "step_00000002"
    if damage == "distcp":
        part = next(p for p in newest.iterdir() if p.suffix == ".distcp")
        part.write_bytes(part.read_bytes()[:20])  # truncated
    else:
        (newest / ckpt.META).write_text("{not json")
    dst = Holder(["a"], seed=3)
    path, meta = ckpt.load_newest_readable(str(tmp_path), {"model": dst})
    assert path.endswith("step_00000001") and meta["step"] == 1
    torch.testing.assert_close(dst.tables["a"], first)
    if damage == "distcp":
        assert "step_00000002" in caplog.text


def test_unreadable_checkpoint_error_names_it(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 1, {"model": Holder(["a"])}, meta={"step": 1})
    path = tmp_path / ckpt.CHECKPOINT_DIR / "step_00000001"
    for part in path.iterdir():
        if part.suffix == ".distcp":
            part.write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="step_00000001"):
        ckpt.load_checkpoint(str(path), {"model": Holder(["a"])})
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint.*step_00000001"):
        ckpt.load_newest_readable(str(tmp_path), {"model": Holder(["a"])})


def test_best_checkpoint_survives_rotation_and_resolves_with_at_best(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(str(tmp_path), step, {"model": Holder(["a"], seed=step)}, meta={"step": step},
                             keep=2, best=step == 2)
    names = sorted(n for n in os.listdir(tmp_path / ckpt.CHECKPOINT_DIR) if n.startswith("step_"))
    assert names == ["step_00000002", "step_00000003", "step_00000004"]
    assert ckpt.require_checkpoint(f"{tmp_path}@best").endswith("step_00000002")
    assert ckpt.require_checkpoint(str(tmp_path)).endswith("step_00000004")
    other = tmp_path / "other"
    ckpt.save_checkpoint(str(other), 1, {"model": Holder(["a"])}, meta={"step": 1})
    with pytest.raises(ckpt.CheckpointError, match="no best checkpoint"):
        ckpt.require_checkpoint(f"{other}@best")


def _fallback_on_ranks(rank, world_size, run_dir):
    model = Holder(["a"], seed=0)
    ckpt.save_checkpoint(run_dir, 1, {"model": model}, meta={"step": 1})
    ckpt.save_checkpoint(run_dir, 2, {"model": model}, meta={"step": 2})
    if rank == 0:
        newest = os.path.join(run_dir, ckpt.CHECKPOINT_DIR, "step_00000002")
        for name in os.listdir(newest):
            if name.endswith(".distcp"):
                with open(os.path.join(newest, name), "wb") as f:
                    f.write(b"garbage")
    torch.distributed.barrier()
    path, meta = ckpt.load_newest_readable(run_dir, {"model": Holder(["a"], seed=1)})
    return os.path.basename(path), meta["step"]


def test_two_ranks_fall_back_together(tmp_path):
    from tests.dist_utils import run_ranks

    assert run_ranks(_fallback_on_ranks, 2, str(tmp_path)) == [("step_00000001", 1)] * 2


# ---------------------------------------------------------------- damaged checkpoints are never absent


def _files(root):
    """Every file under ``root`` with its bytes."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            path = os.path.join(d, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_every_meta_damaged_is_an_error_naming_each_and_nothing_changes(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(str(tmp_path), step, {"model": Holder(["a"], seed=step)}, meta={"step": step})
    root = tmp_path / ckpt.CHECKPOINT_DIR
    (root / "step_00000001" / ckpt.META).write_text('{"step": 1, "sam')  # truncated
    (root / "step_00000002" / ckpt.META).unlink()  # deleted
    before = _files(tmp_path)
    assert [os.path.basename(p) for p in ckpt.checkpoint_dirs(str(tmp_path))] == ["step_00000001", "step_00000002"]
    assert ckpt.complete_checkpoints(str(tmp_path)) == []
    with pytest.raises(ckpt.CheckpointError, match=r"no readable checkpoint.*step_00000002.*missing.*step_00000001"):
        ckpt.load_newest_readable(str(tmp_path), {"model": Holder(["a"])})
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint"):
        ckpt.require_checkpoint(str(tmp_path))
    assert _files(tmp_path) == before


def test_fallback_past_a_deleted_meta_warns_naming_both(tmp_path, caplog):
    for step in (1, 2):
        ckpt.save_checkpoint(str(tmp_path), step, {"model": Holder(["a"], seed=step)}, meta={"step": step})
    newest = tmp_path / ckpt.CHECKPOINT_DIR / "step_00000002"
    (newest / ckpt.META).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ckpt.logger.name):
        path, meta = ckpt.load_newest_readable(str(tmp_path), {"model": Holder(["a"])})
    assert path.endswith("step_00000001") and meta["step"] == 1
    assert "step_00000001" in caplog.text and f"{newest / ckpt.META} is missing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ckpt.logger.name):
        assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000001")  # the passes' lookup warns too
    assert "step_00000002" in caplog.text


def test_a_save_never_deletes_a_checkpoint_it_did_not_write(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(str(tmp_path), step, {"model": Holder(["a"], seed=step)}, meta={"step": step})
    root = tmp_path / ckpt.CHECKPOINT_DIR
    (root / "step_00000002" / ckpt.META).write_text("{not json")
    damaged = _files(root / "step_00000002")
    # A resume went back to step 1 and trains past step 2 again: the damaged step 2 is kept aside...
    for step in (2, 3, 4):
        ckpt.save_checkpoint(str(tmp_path), step, {"model": Holder(["a"], seed=10 + step)}, meta={"step": step})
    assert _files(root / "step_00000002.replaced-1") == damaged
    # ...and rotation deletes readable checkpoints only, older than the two newest.
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    assert names == ["step_00000002.replaced-1", "step_00000003", "step_00000004"]
    (root / "step_00000003" / ckpt.META).write_text("")
    ckpt.save_checkpoint(str(tmp_path), 5, {"model": Holder(["a"])}, meta={"step": 5})
    assert (root / "step_00000003").is_dir()  # damaged: not rotated away
