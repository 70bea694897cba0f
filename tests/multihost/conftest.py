"""Two-host tests (network namespaces on this machine). They take minutes, so the main suite
skips them in one line; .ci/lanes/30-two-hosts.sh runs them (MULTIHOST=1). Where namespaces
cannot be made (not root, no iproute2) they skip with the reason, except
under MULTIHOST=1, where that is a failure: in CI nothing skips."""

import os
from pathlib import Path

import pytest

from tests.multihost.hosts import TwoHosts, why_unavailable

_GATE = "two-host tests run in .ci/lanes/30-two-hosts.sh (set MULTIHOST=1 to run them here)"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MULTIHOST") == "1":
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=_GATE))


def required(reason):
    """Skip with the reason; but where MULTIHOST=1 asked for these tests (CI's lane) fail instead."""
    if os.environ.get("MULTIHOST") == "1":
        pytest.fail(f"MULTIHOST=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def two_hosts(tmp_path):
    reason = why_unavailable()
    if reason:
        required(reason)
    with TwoHosts(tmp_path / "hosts") as hosts:
        yield hosts
