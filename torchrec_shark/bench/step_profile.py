"""Where a training step's time goes: ``train.py`` with a window of steps under a profiler.

Runs ``train.py`` (any Hydra overrides) and profiles steps ``[--start, --start + --steps)`` as the
trainer runs them (the whole step: input, lookup, backward, optimizer, label bookkeeping,
re-tiering, ``step_end``), with ``cProfile`` (Python functions, cumulative and own time) or
``torch.profiler`` (``--torch``: operators, own CPU time). Rank 0 prints the top entries.

Run::

    python -m torchrec_shark.bench.step_profile -- tables=shark
    python -m torchrec_shark.bench.step_profile --torch --top 25 -- tables=int8 trainer.batch_size=2048

Times on a loaded machine are inflated alike for every entry: read the shares, not the seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import runpy
import sys
import tempfile
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", type=int, default=30, help="first profiled step (the warm-up before it is not)")
    p.add_argument("--steps", type=int, default=20, help="steps profiled")
    p.add_argument("--top", type=int, default=30, help="entries printed")
    p.add_argument("--torch", action="store_true", help="torch.profiler's operator table instead of cProfile")
    p.add_argument("--sort", default="cumulative", help="cProfile sort key: cumulative or tottime")
    p.add_argument("--callers", default=None, help="cProfile: also print who calls the functions matching this")
    p.add_argument("overrides", nargs="*", help="train.py's Hydra overrides (after --)")
    a = p.parse_args(argv)

    from torchrec_shark.training import trainer

    end = a.start + a.steps
    rank = int(os.environ.get("RANK", "0"))

    class ProfiledTrainer(trainer.Trainer):
        profiler = None

        def before_step(self, step: int) -> None:
            if step == a.start:
                if a.torch:
                    import torch.profiler

                    self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    self.profiler.__enter__()
                else:
                    self.profiler = cProfile.Profile()
                    self.profiler.enable()
            elif step == end:
                self._report()

        def _report(self) -> None:
            prof, self.profiler = self.profiler, None
            if prof is None:
                return
            if a.torch:
                prof.__exit__(None, None, None)
                text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top)
            else:
                prof.disable()
                out = io.StringIO()
                stats = pstats.Stats(prof, stream=out).sort_stats(a.sort)
                stats.print_stats(a.top)
                if a.callers:
                    stats.print_callers(a.callers)
                text = out.getvalue()
            if rank == 0:
                print(f"--- profile of steps [{a.start}, {end}) ---\n{text}", flush=True)

    trainer.Trainer = ProfiledTrainer
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = [os.path.join(ROOT, "train.py"), f"hydra.run.dir={tmp}/run", "trainer.progress=false",
                    f"trainer.max_steps={end + 1}", f"trainer.eval_every={end + 1}",
                    f"trainer.checkpoint_every={end + 1}", "trainer.eval_batches=1", *a.overrides]
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
