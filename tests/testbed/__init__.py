"""The multi-host SSH testbed: network + mount namespaces with one sshd each (see netns.py)."""

from tests.testbed.netns import (
    Testbed,
    TestbedError,
    TestHost,
    cleanup_stale,
    environment_problem,
)

__all__ = ["Testbed", "TestbedError", "TestHost", "cleanup_stale", "environment_problem"]
