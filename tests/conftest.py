"""``slow``: tests that take minutes (the README's pipeline, pruning-loop and benchmark examples), run with
``pytest -m slow`` (``make test-slow``); skipped otherwise to keep ``make test`` within its time budget."""

import pytest


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
