"""Shared fixtures of the unit tests."""

import pytest

from megamlm.ops import cpu_kernels
from tests import data_fixtures as F


@pytest.fixture(scope="session")
def shards():
    """A small shard folder of generated documents (tests/data_fixtures.py), made once."""
    return F.shards()


@pytest.fixture(scope="session")
def tok():
    """The tests' SentencePiece model (tests/data_fixtures.py), trained once."""
    return F.tokenizer()


@pytest.fixture(params=[True, False], ids=["kernels", "torch-ops"])
def kernels(request):
    """Run the test twice: with the compiled CPU kernels, and with the torch-ops fallback (the path of
    a machine without a C compiler). The kernel run is skipped where they cannot be built."""
    if request.param and not cpu_kernels.available():
        pytest.skip("no C compiler: kernels not built")
    previous = cpu_kernels.set_enabled(request.param)
    yield request.param
    cpu_kernels.set_enabled(previous)
