"""User-facing errors: each carries a message meant for an operator and an exit code."""

from __future__ import annotations


class StackctlError(Exception):
    """An error the CLI prints as one paragraph, without a traceback."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InventoryError(StackctlError):
    """The inventory (or a scenario/config file) is wrong: exit code 2."""

    exit_code = 2


class DeployError(StackctlError):
    """A deployment step failed on one or more hosts."""

    exit_code = 1
