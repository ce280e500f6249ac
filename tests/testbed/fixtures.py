"""pytest fixtures for the multi-host SSH testbed.

Fixtures:
  testbed_factory(n_hosts=2, *, bastion=False, behind_bastion=None, deploy_dir="/opt/stackctl") -> Testbed
                 session-scoped factory; every testbed it made is removed at session end.
  testbed        a session-scoped Testbed of 3 hosts (h1..h3), shared: leave it as you found it.
  wheelhouse     a session-scoped Path to the stackctl + dependencies wheelhouse.
Without root / ip netns / sshd the tests skip with the reason; with $CI set they fail instead.
To use these from other test directories, put ``pytest_plugins = ["tests.testbed.fixtures"]``
in the top-level tests/conftest.py.
"""

from __future__ import annotations

import os

import pytest

from tests.testbed.netns import Testbed, cleanup_stale, environment_problem


def require_testbed() -> None:
    """Skip (or, under CI, fail) with the reason the testbed cannot run here."""
    problem = environment_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the SSH testbed cannot run: {problem}", pytrace=False)
    pytest.skip(f"SSH testbed unavailable: {problem}")


@pytest.fixture(scope="session")
def testbed_factory():
    require_testbed()
    cleanup_stale()  # leftovers of crashed runs (their owner process is gone)
    made: list[Testbed] = []

    def make(n_hosts: int = 2, **options) -> Testbed:
        testbed = Testbed(n_hosts, **options)
        made.append(testbed)
        return testbed.start()

    yield make
    for testbed in made:
        testbed.cleanup()


@pytest.fixture(scope="session")
def testbed(testbed_factory) -> Testbed:
    return testbed_factory(3)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory):
    from tests.helpers.wheelhouse import build_wheelhouse

    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))
