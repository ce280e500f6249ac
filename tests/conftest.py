"""Shared pytest configuration: the testbed fixtures are available to every test directory."""

pytest_plugins = ["tests.testbed.fixtures"]
