"""The pipeline's stages: each one a ``train.py`` run or a pass, run as a subprocess.

Stages are chained through files: a pass writes ``prune_report.json`` / ``widths.json``
with the ``torchrun train.py`` command that trains its rewritten config warm-started from
its source run; the next stage runs that command with its own run dir and step count.
A stage whose output already exists is skipped (``resume``), so a crashed pipeline
continues where it stopped, but only when it was built with the same settings: each stage
records in ``stage.json`` a fingerprint of its command, of the config files it reads (a preset
edited in ``conf/`` changes it) and of the fingerprints of the stages it reads from. A stage whose
fingerprint differs (other steps, budget, data...) or that has none is run again; what its dir held is
moved aside to ``<dir>.replaced-<n>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from torchrec_shark.passes.command_line import hydra_quote

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF_DIR = os.path.join(ROOT, "conf")


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (torchrun), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else name


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def with_overrides(args: Sequence[str], overrides: Sequence[str]) -> List[str]:
    """``args`` with every override whose key ``overrides`` sets again removed, then ``overrides``."""
    again = {_key(o) for o in overrides}
    return [a for a in args if "=" not in a or _key(a) not in again] + list(overrides)


def torchrun(nproc: int, *args: str) -> List[str]:
    return [_bin("torchrun"), "--standalone", f"--nproc_per_node={nproc}", *args]


def command_from_pass(command: str, run_dir: str, overrides: Sequence[str]) -> List[str]:
    """The ``torchrun ... train.py ...`` command a pass printed, with our run dir and overrides."""
    args = shlex.split(command)
    script = args.index("train.py")
    launcher = [a for a in args[1:script] if not a.startswith("--nproc_per_node")]
    nproc = next(a for a in args[1:script] if a.startswith("--nproc_per_node")).split("=", 1)[1]
    rest = [a for a in args[script + 1:] if a != "hydra.run.dir=<NEW_RUN_DIR>"]
    return torchrun(int(nproc), *[a for a in launcher if a != "--standalone"], "train.py",
                    *with_overrides(rest, [*overrides, f"hydra.run.dir={hydra_quote(run_dir)}"]))


@dataclass
class StageResult:
    name: str
    kind: str  # train | pass
    out_dir: str
    seconds: float
    skipped: bool
    command: List[str] = field(default_factory=list)
    fingerprint: str = ""


STAGE_FILE = "stage.json"


RESUME = "trainer.resume=true"


def config_files(command: Sequence[str], conf_dir: str = CONF_DIR) -> List[str]:
    """The files under ``conf_dir`` a command's Hydra config is made of, as far as its arguments say: for
    ``train.py`` the root config and the option of every group it picks (its defaults, or ``group=option``
    given); for ``-m <module>`` the config named after the module (``conf/*/<name>.yaml``); and any other
    ``group=option`` argument that names a file (``tables=shark``: ``conf/tables/shark.yaml``)."""
    args = list(command)
    chosen: Dict[str, str] = {}
    files: List[str] = []
    if "train.py" in args:
        root = os.path.join(conf_dir, "config.yaml")
        if os.path.exists(root):
            files.append(root)
            from omegaconf import OmegaConf

            for entry in OmegaConf.to_container(OmegaConf.load(root)).get("defaults", []):
                if isinstance(entry, dict):
                    chosen.update({k: v for k, v in entry.items() if isinstance(v, str) and "/" not in k
                                   and not k.startswith("override")})
    if "-m" in args and args.index("-m") + 1 < len(args):
        name = args[args.index("-m") + 1].rsplit(".", 1)[-1]
        for group in sorted(os.listdir(conf_dir)) if os.path.isdir(conf_dir) else []:
            path = os.path.join(conf_dir, group, f"{name}.yaml")
            if os.path.isfile(path):
                files.append(path)
    for a in args:
        if "=" in a and not a.startswith("-"):
            key, value = a.split("=", 1)
            chosen[key.lstrip("+~")] = value
    for group, option in sorted(chosen.items()):
        path = os.path.join(conf_dir, group, f"{option}.yaml")
        if "." not in group and os.path.isfile(path):
            files.append(path)
    return files


def stage_fingerprint(command: Sequence[str], root: str, upstream: Dict[str, str], conf_dir: str = CONF_DIR) -> str:
    """What a stage's output depends on: its command (the pipeline dir and the launcher's own path
    left out, so a moved pipeline or venv still matches; and ``trainer.resume=true``, which a stage that has
    checkpoints gets and which does not change what it computes), the content of the config files it reads
    (:func:`config_files`) and its upstream stages' fingerprints."""
    args = [os.path.basename(command[0]), *(a.replace(root, "<OUT>") for a in command[1:] if a != RESUME)] \
        if command else []
    configs = {os.path.relpath(path, conf_dir): hashlib.sha256(open(path, "rb").read()).hexdigest()
               for path in config_files(command, conf_dir)}
    text = json.dumps({"command": args, "upstream": upstream, "configs": configs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _move_aside(out_dir: str) -> str:
    n = 1
    while os.path.exists(f"{out_dir}.replaced-{n}"):
        n += 1
    os.rename(out_dir, f"{out_dir}.replaced-{n}")
    return f"{out_dir}.replaced-{n}"


class StageRunner:
    """Runs stages under ``out_dir``, logging each one's output to ``<stage dir>/stage.log``."""

    def __init__(self, out_dir: str, resume: bool = True) -> None:
        self.out_dir = os.path.abspath(out_dir)
        self.resume = resume
        self.results: Dict[str, StageResult] = {}

    def path(self, *parts: str) -> str:
        return os.path.join(self.out_dir, *parts)

    def run(self, name: str, kind: str, out_dir: str, command: List[str], done_file: str,
            after: Sequence[str] = ()) -> StageResult:
        """Run ``command`` unless ``out_dir`` holds its output built with the same settings
        (``after``: the stages whose output it reads)."""
        fp = stage_fingerprint(command, self.out_dir, {n: self.results[n].fingerprint for n in after})
        saved = read_json(os.path.join(out_dir, STAGE_FILE)) or {}
        done = os.path.isfile(os.path.join(out_dir, done_file))
        if self.resume and done and saved.get("fingerprint") == fp:
            result = StageResult(name, kind, out_dir, 0.0, True, command, fp)
            print(f"[pipeline] {name}: already done in {out_dir}", flush=True)
        else:
            if os.path.isdir(out_dir) and os.listdir(out_dir):
                why = ("built with other settings" if saved.get("fingerprint") else "no settings recorded") \
                    if done else "unfinished"
                moved = _move_aside(out_dir)
                print(f"[pipeline] {name}: {out_dir} holds a stage {why}: moved to {moved}, running it again",
                      flush=True)
            os.makedirs(out_dir, exist_ok=True)
            print(f"[pipeline] {name}: {' '.join(shlex.quote(c) for c in command)}", flush=True)
            t0 = time.perf_counter()
            with open(os.path.join(out_dir, "stage.log"), "w") as log:
                # in the directory the pipeline was started from (the repository root, where train.py is),
                # so that relative paths in its overrides (data.path=...) mean what they meant there
                proc = subprocess.run(command, cwd=os.getcwd(), stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, PYTHONUNBUFFERED="1"))
            seconds = time.perf_counter() - t0
            if proc.returncode != 0 or not os.path.isfile(os.path.join(out_dir, done_file)):
                tail = _tail(os.path.join(out_dir, "stage.log"))
                raise RuntimeError(f"pipeline stage {name!r} failed (exit {proc.returncode}); "
                                   f"last lines of {out_dir}/stage.log:\n{tail}")
            result = StageResult(name, kind, out_dir, seconds, False, command, fp)
            with open(os.path.join(out_dir, STAGE_FILE), "w") as f:
                json.dump({"fingerprint": fp, "command": command, "after": list(after), "seconds": seconds}, f,
                          indent=2)
            print(f"[pipeline] {name}: done in {seconds:.0f} s", flush=True)
        self.results[name] = result
        return result

    def _continue(self, run_dir: str) -> List[str]:
        """A crashed training stage continues from its checkpoints (a fresh run refuses a dir that has some)."""
        from torchrec_shark.training.checkpoint import checkpoint_dirs

        return [RESUME] if self.resume and checkpoint_dirs(run_dir) else []

    def train(self, name: str, nproc: int, overrides: Sequence[str], after: Sequence[str] = ()) -> StageResult:
        run_dir = self.path("runs", name)
        cmd = torchrun(nproc, "train.py", *overrides, *self._continue(run_dir), f"hydra.run.dir={hydra_quote(run_dir)}",
                       "trainer.progress=false")
        return self.run(name, "train", run_dir, cmd, "metrics.json", after)

    def train_from_pass(self, name: str, command: str, overrides: Sequence[str],
                        after: Sequence[str] = ()) -> StageResult:
        run_dir = self.path("runs", name)
        cmd = command_from_pass(command, run_dir, [*overrides, *self._continue(run_dir), "trainer.progress=false"])
        return self.run(name, "train", run_dir, cmd, "metrics.json", after)

    def run_pass(self, name: str, module: str, nproc: int, args: Sequence[str], done_file: str,
                 after: Sequence[str] = ()) -> StageResult:
        out = self.path("passes", name)
        cmd = torchrun(nproc, "-m", module, *args, f"hydra.run.dir={hydra_quote(out)}")
        return self.run(name, "pass", out, cmd, done_file, after)


def read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
