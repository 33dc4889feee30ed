"""Command-line conventions shared by ``train.py``, the passes and the pipeline.

Exit codes: 0 done; 1 failed while running (an error during training or a pass, a crashed rank);
2 refused before starting: a usage or config error (unknown or mistyped key, unknown preset, a
value that cannot work, a missing file or checkpoint, a busy run dir). ``dim_search`` adds 3 (the
budget cannot be met). Under ``torchrun`` the launcher itself exits 1 whenever a worker fails; the
worker's own code is the ``exitcode`` in its summary.

Overrides are checked against the config schema before Hydra composes anything, so a typo is
answered with the nearest valid key or preset instead of a stack of Hydra internals.

Example::

    if __name__ == "__main__":
        run_hydra_app(main, TrainConfig, conf_dir="conf")   # main is a @hydra.main function marked @job
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import sys
import typing
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from torchrec_shark.config import ConfigError

EXIT_FAILED = 1
EXIT_USAGE = 2

_job_started = False


def job(fn: Callable) -> Callable:
    """Marks the Hydra task function: an exit before it runs is Hydra refusing the command line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _job_started
        _job_started = True
        return fn(*args, **kwargs)

    return wrapper


def schema_keys(schema: type, prefix: str = "") -> Tuple[List[str], List[str]]:
    """``(keys, mappings)``: every dotted key of a dataclass schema, and those that take any sub-key."""
    keys, mappings = [], []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, hint = prefix + f.name, hints[f.name]
        if typing.get_origin(hint) is typing.Union:  # Optional[X]
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        keys.append(key)
        if dataclasses.is_dataclass(hint):
            sub, sub_maps = schema_keys(hint, key + ".")
            keys += sub
            mappings += sub_maps
        elif typing.get_origin(hint) in (dict, typing.Dict):
            mappings.append(key)
    return keys, mappings


def nearest(word: str, choices: Iterable[str], cutoff: float = 0.8) -> Optional[str]:
    """The choice closest to ``word`` by spelling, when one is close enough: a sibling whose last part
    is close (``trainer.max_stepz`` -> ``trainer.max_steps``), else a key of the same depth that is."""
    choices = list(choices)
    depth = word.count(".")
    same_depth = [c for c in choices if c.count(".") == depth]
    if depth:
        parent, leaf = word.rsplit(".", 1)
        elsewhere = [c for c in choices if c.endswith("." + leaf)]  # the right key under another group
        if len(elsewhere) == 1:
            return elsewhere[0]
        siblings = {c.rsplit(".", 1)[1]: c for c in same_depth if c.startswith(parent + ".")}
        found = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        if found:
            return siblings[found[0]]
    found = difflib.get_close_matches(word, same_depth, n=1, cutoff=cutoff)
    return found[0] if found else None


def _presets(group: str, conf_dirs: Sequence[str]) -> List[str]:
    names = set()
    for d in conf_dirs:
        folder = os.path.join(d, group)
        if os.path.isdir(folder):
            names |= {n[: -len(".yaml")] for n in os.listdir(folder) if n.endswith(".yaml")}
    return sorted(names)


def _groups(conf_dirs: Sequence[str]) -> List[str]:
    return sorted({n for d in conf_dirs if os.path.isdir(d) for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))})


def check_overrides(argv: Sequence[str], schema: type, conf_dir: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` for an override whose key the schema lacks or whose preset does not
    exist, naming the nearest valid one. Keys under ``hydra.``, and command lines with Hydra's flags, are
    Hydra's to check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    if any(a.startswith("-") for a in argv):  # Hydra's flags (--cfg job, -m, --help ...): Hydra's to check
        return
    parser, overrides = OverridesParser.create(), []
    for arg in argv:
        try:
            overrides += parser.parse_overrides([arg])
        except OverrideParseException as e:
            raise ConfigError(f"{arg!r} does not parse as an override: {str(e).splitlines()[0]}") from None
    conf_dirs = [conf_dir] if conf_dir else []
    for o in overrides:  # the retrain commands the passes print add their folder of presets
        if o.key_or_group == "hydra.searchpath" and isinstance(o.value(), list):
            conf_dirs += [p[len("file://"):] for p in o.value() if isinstance(p, str) and p.startswith("file://")]
    groups = _groups(conf_dirs)
    keys, mappings = schema_keys(schema)
    for o in overrides:
        key = o.key_or_group
        if key.startswith(("hydra.", "hydra/")) or key == "hydra" or o.is_delete():
            continue
        if key in groups and "." not in key:
            choice = o.value()
            presets = _presets(key, conf_dirs)
            if isinstance(choice, str) and choice not in presets:
                hint = nearest(choice, presets, cutoff=0.6)
                raise ConfigError(f"{o.input_line}: no preset {choice!r} in the {key!r} group "
                                  f"(presets: {', '.join(presets)})" + (f"; did you mean {key}={hint}?" if hint else ""))
            continue
        if key in keys or any(key.startswith(m + ".") for m in mappings):
            continue
        hint = nearest(key, keys)
        raise ConfigError(f"unknown key {key!r} in {o.input_line!r}" + (f"; did you mean {hint!r}?" if hint else ""))


def refuse(message: str, prog: Optional[str] = None) -> None:
    """Print a usage or config error (rank 0 of a ``torchrun`` job only: every rank has the same)
    and exit with :data:`EXIT_USAGE`."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog + ': ' if prog else ''}config error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def run_hydra_app(main: Callable[[], None], schema: type, conf_dir: Optional[str] = None,
                  prog: Optional[str] = None, argv: Optional[Sequence[str]] = None) -> None:
    """Check the command line (:func:`check_overrides`), then run the Hydra app ``main``; Hydra's own
    refusal of the command line (exit 1 before the ``@job`` function starts) becomes :data:`EXIT_USAGE`."""
    try:
        check_overrides(sys.argv[1:] if argv is None else argv, schema, conf_dir)
    except ConfigError as e:
        refuse(str(e), prog)
    try:
        main()
    except SystemExit as e:
        if e.code == EXIT_FAILED and not _job_started:
            sys.exit(EXIT_USAGE)
        raise
