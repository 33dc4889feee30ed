"""A damaged ``meta.json`` is reported with its path."""

import pytest
from torch import nn

from torchrec_shark.training import checkpoint as ckpt


def test_truncated_meta_json_is_named(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), 2, {"model": nn.Linear(2, 2)}, meta={"step": 2, "config": {}})
    meta = tmp_path / ckpt.CHECKPOINT_DIR / "step_00000002" / "meta.json"
    meta.write_text(meta.read_text()[:7])
    with pytest.raises(ckpt.CheckpointError, match=f"{meta} is not valid JSON"):
        ckpt.read_meta(path)
