"""Markers skipped unless selected with ``-m``, to keep ``make test`` within its time budget:

- ``slow``: tests that start many jobs (the README's pipeline, pruning-loop and benchmark examples, multi-job
  end-to-end runs): ``pytest -m slow`` (``make test-slow``);
- ``torchrec_full``: the whole TorchRec-harness matrix (every kind x sharding type): ``pytest -m torchrec_full``
  (``make test-torchrec``).
"""

import pytest

OPT_IN = {"slow": "slow: run with -m slow (make test-slow)",
          "torchrec_full": "full TorchRec matrix: run with -m torchrec_full (make test-torchrec)"}


def pytest_collection_modifyitems(config, items):
    selected = config.getoption("-m") or ""
    for marker, reason in OPT_IN.items():
        if marker in selected:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
