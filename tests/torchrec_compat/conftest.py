"""``torchrec_full``: the whole TorchRec-harness matrix (every kind x sharding type), run with
``pytest -m torchrec_full`` (``make test-torchrec``); skipped otherwise to keep the suite fast."""

import pytest


def pytest_collection_modifyitems(config, items):
    if "torchrec_full" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="full TorchRec matrix: run with -m torchrec_full (make test-torchrec)")
    for item in items:
        if "torchrec_full" in item.keywords:
            item.add_marker(skip)
