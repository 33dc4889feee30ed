"""Every command in the README's ``bash`` blocks runs as printed, at small sizes.

The commands are read from README.md itself, so the two cannot drift apart. Each runs in README
order (later commands read earlier runs: ``outputs/base``, ``outputs/early_stop``) in one scratch
directory laid out like a checkout with ``.venv`` active, shrunk by overrides appended to it (a
later override wins), and must exit 0, or with the code its comment names (``# exits 2``). A
command whose comment holds ``[skipped by tests/test_readme.py: <why>]`` is not run; an entry point
with no small size known here fails the test, so a new README command cannot go unrun.

``python`` and ``torchrun`` commands run through :mod:`tests.fork_launcher` (their entry point's
``__main__`` in a forked process per rank, without importing torch and TorchRec again); ``make``
runs as itself. Commands that start many jobs of their own (the pipeline, the pruning loop, the
dense-transform benchmark) are marked ``slow``: ``make test-slow`` runs them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import pytest

from tests.fork_launcher import ForkLauncher
from torchrec_shark.data.samples import write_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SKIP = re.compile(r"\[skipped by tests/test_readme\.py: ([^\]]+)\]")
EXITS = re.compile(r"#\s*exits (\d+)")

# Small sizes per entry point, appended to the command. train.py keeps the default data's 24 fields
# (the passes' examples drop 8 of them) with tables of at most 10,000 rows.
TRAIN_SMALL = [
    "trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.eval_batches=1",
    "trainer.batch_size=64", "trainer.progress=false",
    "data.synthetic.cardinalities=[10000,3000,1000,1000,300,100,100,30,30,10,10,10,10,10,10,10,10,10,3000,1000,100,10,10,10]",
    "data.synthetic.num_val_samples=256",
    "tables.compression.tensor_train.min_rows=1000",
]
SMALL: Dict[str, List[str]] = {
    "train.py": TRAIN_SMALL,
    "torchrec_shark.passes.prune_fields": ["num_batches=1"],
    "torchrec_shark.passes.dim_search": ["num_batches=1"],
    "torchrec_shark.passes.prune_loop": ["finetune_steps=2", "max_rounds=1", "num_batches=1"],
    "torchrec_shark.pipeline": ["steps=2", "finetune_steps=2"],  # and TRAIN_SMALL in its train=[...]
    "torchrec_shark.bench.tabular_transforms": ["--rows", "3000", "--steps", "2"],
    "torchrec_shark.bench.tables": ["--small", "--tables", "4"],
    "torchrec_shark.data.samples": [],
    "torchrec_shark.export": [],
    "torchrec_shark.score": [],
    "torchrec_shark.bench.presets": ["--dims", "16", "--seeds", "0", "--steps", "2", "--eval-batches", "1",
                                     "--presets", "baseline,shark", "--train", *TRAIN_SMALL],
    "torchrec_shark.bench.serve": ["--presets", "baseline,int8,shark", "--steps", "2", "--batch-sizes", "64",
                                   "--rounds", "1", "--iters", "1", "--train", *TRAIN_SMALL],
    "make data": [],
    "make train": [],  # ARGS gets TRAIN_SMALL
}
# Entry points that start many jobs of their own: minutes even at small sizes.
SLOW = {"torchrec_shark.pipeline", "torchrec_shark.passes.prune_loop", "torchrec_shark.bench.tabular_transforms",
        "torchrec_shark.bench.presets", "torchrec_shark.bench.serve"}
# Links that make the scratch directory look like a checkout.
CHECKOUT = ("train.py", "conf", "torchrec_shark", "Makefile", "pyproject.toml", "requirements")


@dataclass
class ReadmeCommand:
    line: int
    text: str  # as printed, continuation lines joined
    skip: Optional[str]  # why it is not run
    exit_code: int

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.text[:60]}"


def readme_commands(path: str = README) -> List[ReadmeCommand]:
    """The commands of the ``bash`` blocks, one per (joined) line, comment-only lines left out."""
    commands, in_bash, pending, start = [], False, "", 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                in_bash = not in_bash and stripped == "```bash"
                continue
            if not in_bash:
                continue
            if not pending:
                start = n
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            text, pending = (pending + stripped).strip(), ""
            if not text or text.startswith("#"):
                continue
            skip, exits = SKIP.search(text), EXITS.search(text)
            commands.append(ReadmeCommand(start, text, skip.group(1) if skip else None,
                                          int(exits.group(1)) if exits else 0))
    return commands


def entry_point(argv: List[str]) -> str:
    """``train.py``, a module run with ``-m``, or ``make <target>``."""
    if argv[0] == "make":
        return "make " + next(a for a in argv[1:] if "=" not in a and not a.startswith("-"))
    if argv[0] == "torchrun":
        i = 1
        while argv[i].startswith("--") and argv[i] != "-m":
            i += 1
        argv = ["python", *argv[i:]]
    if argv[0] in ("python", "python3"):
        return argv[2] if argv[1] == "-m" else argv[1]
    raise AssertionError(f"no way to run {argv[0]!r} known here: mark the command or teach tests/test_readme.py")


def _with_train_list(argv: List[str]) -> List[str]:
    """The pipeline's ``train=[...]``, extended by TRAIN_SMALL (a second ``train=`` would replace it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = next((a for a in argv if a.startswith("train=")), None)
    items = list(OverridesParser.create().parse_overrides([given])[0].value()) if given else []
    merged = "train=[" + ",".join(f"'{o}'" for o in [*items, *TRAIN_SMALL]) + "]"
    return [a for a in argv if a is not given] + [merged]


def shrink(command: ReadmeCommand):
    """``(env, argv)`` of the command at small sizes."""
    argv = shlex.split(command.text, comments=True)
    env = {}
    while "=" in argv[0] and not argv[0].startswith("-"):  # VAR=value prefixes
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    point = entry_point(argv)
    if point not in SMALL:
        raise AssertionError(f"no small size known for {point!r}: add it to SMALL in tests/test_readme.py, or mark "
                             "the command [skipped by tests/test_readme.py: why]")
    if point == "make train":
        args = [a for a in argv if a.startswith("ARGS=")]
        given = args[0].split("=", 1)[1] if args else ""
        argv = [a for a in argv if not a.startswith("ARGS=")] + ["ARGS=" + " ".join([given, *TRAIN_SMALL]).strip()]
    elif point == "torchrec_shark.pipeline":
        argv = _with_train_list(argv) + SMALL[point]
    else:
        argv = argv + SMALL[point]
    if argv[0] == "make":  # the environment is installed already: never let make reinstall it
        argv = ["make", "-o", ".venv/.installed", *argv[1:]]
    return env, argv


COMMANDS = readme_commands()


def test_readme_has_commands_and_marks_what_it_cannot_run():
    assert len([c for c in COMMANDS if c.skip is None]) >= 20
    for c in COMMANDS:
        if c.skip is None:
            shrink(c)  # every runnable command has a small size


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A scratch directory laid out like a checkout with .venv active and the sample data made."""
    work = tmp_path_factory.mktemp("readme")
    for name in CHECKOUT:
        os.symlink(os.path.join(ROOT, name), work / name)
    os.symlink(sys.prefix, work / ".venv")
    write_samples(str(work / "data" / "samples"), rows=3000)
    env = dict(os.environ, PATH=f"{os.path.join(sys.prefix, 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
               VIRTUAL_ENV=sys.prefix, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(work)  # this checkout's package, as `pip install -e .` would give
    launcher = ForkLauncher(env)
    yield work, env, launcher
    launcher.close()


def _param(c: ReadmeCommand):
    argv = shlex.split(c.text, comments=True)
    while "=" in argv[0]:  # VAR=value prefixes
        argv.pop(0)
    return pytest.param(c, id=c.id, marks=[pytest.mark.slow] if entry_point(argv) in SLOW else [])


def _run(command: ReadmeCommand, work, base_env, launcher, log: str):
    """``(exit code, argv)`` of the command run at small sizes in the scratch checkout."""
    env, argv = shrink(command)
    if argv[0] in ("python", "torchrun"):
        return launcher.run(argv, str(work), {**base_env, **env}, log), argv
    with open(log, "w") as f:
        return subprocess.run(argv, cwd=work, env={**base_env, **env}, stdout=f, stderr=subprocess.STDOUT,
                              timeout=600).returncode, argv


def _prerequisites(command: ReadmeCommand, work) -> List[ReadmeCommand]:
    """The earlier commands that write the ``run_dir=outputs/...`` this one reads, where that run is missing
    (a slow command run without the others, as ``make test-slow`` does)."""
    runs = [a.split("=", 1)[1].split("@")[0] for a in shlex.split(command.text, comments=True)
            if a.startswith("run_dir=")]
    missing = [run for run in runs if run.startswith("outputs/") and not os.path.isdir(os.path.join(work, run))]
    return [c for c in COMMANDS if c.line < command.line and c.skip is None
            and any(f"hydra.run.dir={run}" in shlex.split(c.text, comments=True) for run in missing)]


@pytest.mark.parametrize("command", [_param(c) for c in COMMANDS if c.skip is None])
def test_readme_command_runs(command, checkout, tmp_path):
    work, base_env, launcher = checkout
    for before in _prerequisites(command, work):
        assert _run(before, work, base_env, launcher, str(tmp_path / "before.txt"))[0] == before.exit_code
    log = str(tmp_path / "out.txt")
    t0 = time.perf_counter()
    code, argv = _run(command, work, base_env, launcher, log)
    print(f"README line {command.line}: {time.perf_counter() - t0:.1f} s")
    out = open(log).read()
    assert code == command.exit_code, f"README line {command.line}: {shlex.join(argv)}\n{out[-4000:]}"
