"""A checkpoint, an evaluation, a resume's load or a warm start leaves the training state and the
process as they were.

Speed is a benchmark's business (``python -m torchrec_shark.bench.steady``); this checks what a slowdown
after a save came from: threads that outlive the save (a gloo worker thread's OpenMP team throttles
the training threads' own team) and tables or optimizer state re-pointed, copied or made to track gradients.
"""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.dist_utils import run_ranks
from tests.training.small_job import ROOT, SMALL


def _tensors(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif hasattr(obj, "local_shards"):
        for i, s in enumerate(obj.local_shards()):
            yield f"{prefix}#{i}", s.tensor
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj


def _layout(trainer, keep_alive=None):
    out = {}
    for name, state in (("model", trainer.model.state_dict()), ("optim", trainer.optimizer.state_dict())):
        for key, t in _tensors(state, name):
            out[key] = (t.untyped_storage().data_ptr(), t.data_ptr(), t.is_contiguous(), t.requires_grad)
            if keep_alive is not None:
                keep_alive.append(t)
    for key, p in trainer.model.named_parameters():
        out[f"param.{key}"] = (p.data_ptr(), p.is_contiguous(), p.requires_grad)
    return out


def _save_and_eval(rank, world_size, run_dir, tables, sharding):
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from torchrec_shark.conf_store import register_configs
    from torchrec_shark.training import checkpoint as ckpt
    from torchrec_shark.training.env import init_distributed
    from torchrec_shark.training.trainer import Trainer

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        # 48k validation predictions in all: a metric gather large enough for a parallel copy on gloo's thread.
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[
            *SMALL, f"tables={tables}", f"planner.sharding_types=[{sharding}]",
            "data.synthetic.num_val_samples=98304", "trainer.eval_batches=192"]))
    env = init_distributed("cpu", 2)  # two intra-op threads per rank: a team that can be throttled
    trainer = Trainer(cfg, run_dir, env)
    batches = trainer._train_batches(0)
    pipeline = TrainPipelineSparseDist(trainer.model, trainer.optimizer, env.device)
    for _ in range(3):
        pipeline.progress(batches)
        if trainer.compressed:
            trainer.collection.step_end()
    held = []  # keeps the first call's tensors alive, so that a copy cannot land at the same address
    first, before = _layout(trainer, held), _layout(trainer)
    # Compressed tables export copies of their rows on each call: only tensors that alias the state count.
    before = {k: v for k, v in before.items() if first.get(k) == v}
    del held
    threads = set(os.listdir("/proc/self/task"))
    trainer._save(3, 3 * 256)
    pipeline.detach()
    trainer.evaluate()
    after, threads_after = _layout(trainer), set(os.listdir("/proc/self/task"))
    changed = sorted(k for k in before if before[k] != after.get(k))
    # What a resumed or warm-started run does before its first step: the same gloo threads would
    # throttle every step after it.
    ckpt.load_newest_readable(run_dir, trainer._stateful())
    loaded = ckpt.warm_start(run_dir, trainer.model, {})["loaded"]
    ckpt.warm_start_optimizer(run_dir, trainer.optimizer, loaded, {})
    threads_after_load = set(os.listdir("/proc/self/task"))
    return changed, sorted(threads_after - threads), sorted(threads_after_load - threads)


@pytest.mark.parametrize("tables,world_size,sharding", [
    ("baseline", 1, "table_wise"), ("shark", 1, "table_wise"), ("baseline", 2, "row_wise")])
def test_save_eval_and_load_leave_tables_optimizer_and_threads_as_they_were(tmp_path, tables, world_size, sharding):
    for changed, new_threads, load_threads in run_ranks(_save_and_eval, world_size, str(tmp_path), tables, sharding):
        assert changed == [], f"tensors re-pointed, copied or made to track gradients by the save: {changed[:5]}"
        assert new_threads == [], f"threads started by the save or the evaluation outlive them: {new_threads}"
        assert load_threads == [], f"threads started by the resume load or the warm start outlive them: {load_threads}"
