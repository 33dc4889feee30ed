"""What a run dir records about how its run was started (``.hydra/``), and the config a resume continues.

The record (``.hydra/config.yaml``: the composed config; ``overrides.yaml``: the command-line
overrides; ``hydra.yaml``: Hydra's own settings) is written by the job that owns the run dir, once
it is accepted (it holds the run dir's lock and its checkpoint, if any, has loaded): Hydra's own
writing is turned off (``hydra.output_subdir: null`` in ``conf/config.yaml``), since it happens
before the job starts and would let a refused or failed job overwrite the record of the run it was
refused for.

A resume continues the recorded config: ``trainer.resume=true hydra.run.dir=RUN`` alone resumes a
``tables=shark`` run. Overrides given on resume are checked against the record; only the keys in
:data:`RESUMABLE_KEYS` (limits, cadences, progress, threads, device, batch size) may change, any
other difference is refused with every differing key named.

Example::

    recorded = recorded_config(run_dir)
    if cfg.trainer.resume and recorded is not None:
        cfg = resume_config(cfg, recorded, HydraConfig.get().overrides.task)
    ...
    write_record(run_dir, cfg, hydra_cfg, overrides)       # once the job is accepted
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from torchrec_shark.config import ConfigError, TrainConfig

RECORD_DIR = ".hydra"
CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.yaml"
HYDRA_FILE = "hydra.yaml"

# What a resume may change: how long and how often, not what is trained.
RESUMABLE_KEYS = (
    "trainer.resume",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.eval_every",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.device",
    "trainer.batch_size",
)


def _schema() -> DictConfig:
    return OmegaConf.structured(TrainConfig)


def recorded_config(run_dir: str) -> Optional[DictConfig]:
    """The config ``run_dir``'s run was started with (``.hydra/config.yaml``; else the config saved in its
    newest readable checkpoint), merged onto the schema; ``None`` for a dir with neither."""
    from torchrec_shark.training import checkpoint as ckpt

    path = os.path.join(run_dir, RECORD_DIR, CONFIG_FILE)
    if os.path.isfile(path):
        raw, where = OmegaConf.load(path), path
    else:
        checkpoint, meta, _ = ckpt.newest_readable_meta(run_dir)
        if not meta or not meta.get("config"):
            return None
        raw, where = OmegaConf.create(meta["config"]), os.path.join(checkpoint, ckpt.META)
    try:
        return OmegaConf.merge(_schema(), raw)  # type: ignore[return-value]
    except Exception as e:  # a record from another version of the schema
        raise ConfigError(f"the run's recorded config {where} does not fit this version's config: "
                          f"{str(e).splitlines()[0]}") from None


def recorded_overrides(run_dir: str) -> List[str]:
    path = os.path.join(run_dir, RECORD_DIR, OVERRIDES_FILE)
    return [str(o) for o in OmegaConf.load(path)] if os.path.isfile(path) else []


def override_key(override: str) -> str:
    """``"+trainer.max_steps=5"`` -> ``"trainer.max_steps"``; ``"tables=shark"`` -> ``"tables"``."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]  # a package suffix (group@pkg=...) names the same group


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def leaf_differences(key: str, a: Any, b: Any) -> Iterator[Tuple[str, Any, Any]]:
    """``(dotted key, a's value, b's value)`` of every leaf under ``key`` where ``a`` and ``b`` differ
    (lists compare whole; a key only one side has differs from ``None``)."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            yield from leaf_differences(f"{key}.{k}" if key else str(k), a.get(k), b.get(k))
    elif a != b:
        yield key, a, b


def config_differences(a: Any, b: Any, keys: Optional[Sequence[str]] = None) -> List[Tuple[str, Any, Any]]:
    """Leaves of two configs that differ, under ``keys`` only (default: everywhere)."""
    out: List[Tuple[str, Any, Any]] = []
    for key in keys if keys is not None else [""]:
        va = OmegaConf.select(a, key, default=None) if key else a
        vb = OmegaConf.select(b, key, default=None) if key else b
        out.extend(d for d in leaf_differences(key, va, vb) if d not in out)
    return out


def resumable(key: str) -> bool:
    return key in RESUMABLE_KEYS


def describe_differences(diffs: Sequence[Tuple[str, Any, Any]], ours: str, theirs: str) -> str:
    return "; ".join(f"{k}: {ours} {a!r}, {theirs} {b!r}" for k, a, b in diffs)


def resume_config(given: DictConfig, recorded: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The recorded config with the resumable keys that ``overrides`` set taken from ``given``.

    Raises :class:`ConfigError` naming every key an override sets to a value other than the run's
    (outside :data:`RESUMABLE_KEYS`)."""
    given = OmegaConf.merge(_schema(), given)  # type: ignore[assignment]
    out = OmegaConf.merge(_schema(), recorded)
    keys = [k for k in (override_key(o) for o in overrides) if k and k != "hydra" and not k.startswith("hydra.")]
    refused = []
    for key, value, was in config_differences(given, recorded, keys):
        if resumable(key):
            OmegaConf.update(out, key, value, merge=False)
        else:
            refused.append((key, was, value))
    if refused:
        raise ConfigError(
            "trainer.resume=true continues the run with its recorded settings (.hydra/config.yaml); these overrides "
            "differ from them: " + describe_differences(refused, "the run has", "this command gives")
            + ". Drop them to resume (only limits, cadences, progress, threads, device and batch size may change), "
            "or start a new run in another hydra.run.dir (trainer.init_from=<run> warm-starts from this one)")
    OmegaConf.update(out, "trainer.resume", True, merge=False)
    return out  # type: ignore[return-value]


def resumed_overrides(recorded: Sequence[str], given: Sequence[str]) -> List[str]:
    """The run's overrides after a resume: the recorded ones, with the resumable keys given now replacing
    (or joining) them; ``trainer.resume`` itself is not part of how the run is configured."""
    given_keys = {override_key(o): o for o in given if resumable(override_key(o)) and override_key(o) != "trainer.resume"}
    out = [o for o in recorded if override_key(o) not in given_keys and override_key(o) != "trainer.resume"]
    return out + list(given_keys.values())


def record_files(cfg: DictConfig, hydra_cfg: Optional[DictConfig], overrides: Sequence[str]) -> Dict[str, str]:
    """``{path under the run dir: text}`` of the record, in Hydra's own format."""
    files = {
        os.path.join(RECORD_DIR, CONFIG_FILE): OmegaConf.to_yaml(cfg),
        os.path.join(RECORD_DIR, OVERRIDES_FILE): OmegaConf.to_yaml(OmegaConf.create(list(overrides))),
    }
    if hydra_cfg is not None:
        files[os.path.join(RECORD_DIR, HYDRA_FILE)] = OmegaConf.to_yaml(hydra_cfg)
    return files


def write_files(run_dir: str, files: Dict[str, str]) -> None:
    """Write each file whole or not at all (a temporary name, then a rename)."""
    for rel, text in files.items():
        path = os.path.join(run_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
