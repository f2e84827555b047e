"""Markers for the whole suite: every test under tests/e2e/ and tests/distributed/ is ``slow`` (real
launchers, process groups, pretraining runs, a Slurm cluster), so that ``pytest -m "not slow"`` is the
fast subset (the unit tests, about 2 minutes on 2 cores). CI runs everything."""

from pathlib import Path

import pytest

_SLOW = ("e2e", "distributed")


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).parent
    for item in items:
        try:
            part = Path(str(item.fspath)).relative_to(root).parts[0]
        except ValueError:
            continue
        if part in _SLOW:
            item.add_marker(pytest.mark.slow)
