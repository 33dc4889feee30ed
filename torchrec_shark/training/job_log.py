"""What a job shows and what it keeps: progress, the plan and results on the console; the whole run in its log.

The console (rank 0) shows this package's INFO lines and warnings; TorchRec, FBGEMM and torch
warnings (deprecations, planner notes) go to the log file only, with every line of this package
from every rank. The log file is appended to, so a resumed or refused run keeps what came before.

Example::

    log_path = setup_job_logging(run_dir, "train.log", rank=env.rank, world_size=env.world_size)
    logging.getLogger("torchrec_shark.training").info("step 10: val_auc=0.71")  # console and train.log
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Optional

OWN = "torchrec_shark"
# Loggers with their own console handler whose notes are for other users (torch.export's tracing
# notice, printed when TorchRec's pipeline traces the model).
QUIET = ("torch.fx._symbolic_trace",)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT_DIR = os.path.dirname(_PACKAGE_DIR)  # train.py's directory in a source checkout


class ConsoleHandler(logging.Handler):
    """Messages as they are (``warning: ...`` for warnings), written through tqdm so a progress bar stays whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            msg = self.format(record)
            if record.levelno >= logging.ERROR:
                msg = f"error: {msg}"
            elif record.levelno >= logging.WARNING:
                msg = f"warning: {msg}"
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # a log line must never end the job
            self.handleError(record)


def _is_own(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR + os.sep) or os.path.dirname(path) == _ROOT_DIR


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """This package's warnings on the console and in the log; other libraries' in the log only.

    A deprecation notice names the caller's line (here, often this package's), but it is about the
    library's API: it goes to the log only."""
    if _is_own(filename) and not issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
        logging.getLogger(f"{OWN}.warnings").warning(str(message))
    else:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        logging.getLogger("py.warnings").warning(text)


def setup_job_logging(run_dir: Optional[str], log_name: str, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """Route logging and warnings as described above; returns the log file's path (``None``: console only).

    Replaces any handler configured before (Hydra's), so calling it again (a second job in one
    process, a test) does not duplicate lines.
    """
    root, own = logging.getLogger(), logging.getLogger(OWN)
    for logger in (root, own):
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
    root.setLevel(logging.WARNING)
    own.setLevel(logging.INFO)
    own.propagate = True  # the root's file handler writes this package's lines too

    console = ConsoleHandler(level=logging.INFO if rank == 0 else logging.ERROR)
    console.setFormatter(logging.Formatter("%(message)s"))
    own.addHandler(console)
    path = None
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, log_name)
        where = f"[rank {rank}]" if world_size > 1 else ""
        handler = logging.FileHandler(path, mode="a")
        handler.setFormatter(logging.Formatter(f"[%(asctime)s]{where}[%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
    warnings.showwarning = _show_warning
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    return path
