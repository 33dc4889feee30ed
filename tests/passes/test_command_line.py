"""The printed retrain command survives paths with spaces, commas, quotes and brackets."""

import os
import shlex

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from torchrec_shark.passes.command_line import hydra_quote
from torchrec_shark.passes.run_loader import retrain_command


def _values(command):
    argv = shlex.split(command)  # what a shell hands to torchrun
    assert argv[:4] == ["torchrun", "--standalone", "--nproc_per_node=2", "train.py"]
    parser = OverridesParser.create()
    return {o.key_or_group: o.value() for o in parser.parse_overrides(argv[4:])}


def test_paths_with_spaces_and_commas_come_back_as_one_value(tmp_path):
    run = tmp_path / "base run, v2 (it's [x])"
    search = tmp_path / "search out"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["data=tabular", "data.path=/data/my files/a b.csv", "trainer.max_steps=7"]),
                   run / ".hydra" / "overrides.yaml")
    command = retrain_command(str(run), str(search), "sseds", extra=["trainer.max_steps=3"], nproc=2)
    values = _values(command)
    assert values["trainer.init_from"] == os.path.abspath(run)
    assert values["hydra.searchpath"] == [f"file://{os.path.abspath(search)}"]
    assert values["data.path"] == "/data/my files/a b.csv"
    assert values["trainer.max_steps"] == 3 and values["tables"] == "sseds"


def test_plain_paths_stay_unquoted():
    assert hydra_quote("/tmp/runs/base-1.2_x") == "/tmp/runs/base-1.2_x"
    assert hydra_quote("/a b") == '"/a b"'


def test_a_pass_names_its_run_dir_its_report_and_the_run_it_reads():
    from torchrec_shark.passes.command_line import dirs_line

    line = dirs_line("prune_fields", "/out/prune", "/runs/base@best", "prune_report.json")
    assert line == ("prune_fields: run dir /out/prune (report: /out/prune/prune_report.json); reads run "
                    "/runs/base@best (metrics: /runs/base/metrics.json)")
