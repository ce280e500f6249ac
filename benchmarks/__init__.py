"""Benchmarks, run from the repository root as modules (``python -m benchmarks.router_overhead``)
so that they import stackctl and the test helpers (tests.helpers, tests.testbed) like the tests do."""
