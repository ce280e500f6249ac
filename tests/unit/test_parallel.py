"""parallel.each and Cancellation: results in order, errors surfaced, and a cancel that stops
waiting at once, closes what was registered and lets no new work start."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from stackctl.parallel import MAX_WORKERS, Cancellation, Interrupted, each


def test_results_in_order_with_bounded_parallelism():
    running, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return i * i

    assert each(range(100), work) == [i * i for i in range(100)]
    assert 1 < peak[0] <= MAX_WORKERS


def test_a_worker_error_is_raised_after_the_others_finish():
    done = []

    def work(i):
        if i == 0:
            raise ValueError("boom")
        time.sleep(0.05)
        done.append(i)

    with pytest.raises(ValueError, match="boom"):
        each(range(4), work)
    assert sorted(done) == [1, 2, 3]


def test_cancel_stops_waiting_closes_connections_and_blocks_new_steps():
    cancellation = Cancellation()
    closed = threading.Event()
    cancellation.on_cancel(closed.set)
    threading.Timer(0.2, cancellation.cancel).start()
    started = time.monotonic()
    with pytest.raises(Interrupted) as caught:
        each(range(3), lambda i: time.sleep(30), cancellation)
    assert time.monotonic() - started < 1.5
    assert caught.value.exit_code == 130
    assert closed.wait(2)
    with pytest.raises(Interrupted):
        cancellation.check()
    late = threading.Event()
    cancellation.on_cancel(late.set)  # registered after the cancel: closed at once
    assert late.is_set()


def test_first_sigint_cancels_and_interrupts_the_main_thread():
    cancellation = Cancellation()
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted):
        with cancellation.on_sigint():
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            each([0], lambda i: time.sleep(30), cancellation)
    assert cancellation.cancelled
    assert signal.getsignal(signal.SIGINT) is previous
