"""Live per-host progress: a rich table on a terminal, one plain line per step otherwise."""

from __future__ import annotations

import sys
import threading
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Progress:
    """Thread-safe: deploy threads call ``update(host, step)``; re-enterable as a context."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 200)
        self.quiet = quiet
        self.steps: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._started = time.monotonic()

    def __enter__(self):
        if self.console.is_terminal and not self.quiet:
            self._live = Live(
                self._table(), console=self.console, refresh_per_second=4, transient=True
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
        return False

    def update(self, host: str, step: str) -> None:
        with self._lock:
            self.steps[host] = (step, time.monotonic())
            if self._live is not None:
                self._live.update(self._table())
            elif not self.quiet:
                self.console.print(
                    f"[{time.monotonic() - self._started:6.1f}s] {host}: {step}",
                    highlight=False,
                    markup=False,
                )

    def echo(self, text: str) -> None:
        if text:
            # soft_wrap: long lines (a diffed command line) stay one line, for the terminal to wrap
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def _table(self) -> Table:
        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("host")
        table.add_column("step")
        table.add_column("since", justify="right")
        now = time.monotonic()
        for host, (step, since) in sorted(self.steps.items()):
            table.add_row(host, step, f"{now - since:.0f}s")
        return table
