"""One function per host, in parallel, and a first Ctrl-C that stops promptly.

Remote steps can run for an hour (pip, model downloads). A thread pool joins its workers at
exit, so Ctrl-C used to wait for whatever step was in flight. Here the workers are daemon
threads, and the first SIGINT cancels: no new step starts (``Cancellation.check``), every
registered connection is closed, which hangs up the remote commands given a terminal
(``Connector.run(hangup=True)``), and the main thread stops waiting at once (Interrupted).
The caller then reports what was left half-done; a second Ctrl-C raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from .errors import StackctlError

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 32


class Interrupted(StackctlError):
    """The operator pressed Ctrl-C: exit code 130, as a shell reports SIGINT."""

    exit_code = 130


class Cancellation:
    """Shared by one command's workers: set once, by the first Ctrl-C (or by ``cancel``)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._closers: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise Interrupted when cancelled: call before each step."""
        if self._event.is_set():
            raise Interrupted("interrupted (Ctrl-C)")

    def on_cancel(self, close: Callable[[], None]) -> None:
        """Call ``close`` (a connection's) when cancelled; at once if that already happened."""
        with self._lock:
            if not self._event.is_set():
                self._closers.append(close)
                return
        with contextlib.suppress(Exception):
            close()

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            closers, self._closers = self._closers, []
        for close in closers:  # in a thread: closing a busy SSH transport may take a moment
            threading.Thread(target=_quietly, args=(close,), daemon=True).start()

    @contextlib.contextmanager
    def on_sigint(self):
        """While inside, the first SIGINT cancels and raises Interrupted in the main thread
        (wherever it waits: for workers, at a prompt, on a remote command); a second one
        raises KeyboardInterrupt. Only the main thread owns signals; elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.cancelled:
                raise KeyboardInterrupt
            self.cancel()
            raise Interrupted("interrupted (Ctrl-C)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _quietly(fn: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        fn()


def each(
    items: Iterable[T], fn: Callable[[T], R], cancellation: Cancellation | None = None
) -> list[R]:
    """``[fn(item) for item in items]`` run in parallel (at most MAX_WORKERS at once), results in
    order. The first exception a worker raises is raised here after all have ended. Once
    ``cancellation`` is cancelled, raises Interrupted without waiting (workers still running
    are daemons: they end with the process)."""
    items = list(items)
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    slots = threading.Semaphore(MAX_WORKERS)

    def work(i: int, item: T) -> None:
        try:
            if cancellation is None or not cancellation.cancelled:
                results[i] = fn(item)
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            errors.append(exc)
        finally:
            slots.release()

    threads = []
    for i, item in enumerate(items):
        while not slots.acquire(timeout=0.1):
            _check(cancellation)
        thread = threading.Thread(target=work, args=(i, item), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        while thread.is_alive():
            thread.join(0.1)
            _check(cancellation)
    _check(cancellation)
    if errors:
        raise errors[0]
    return results


def _check(cancellation: Cancellation | None) -> None:
    if cancellation is not None:
        cancellation.check()
