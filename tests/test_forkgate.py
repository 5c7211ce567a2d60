"""The gate that keeps a fork out of another thread's SQLite call."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from flask_restful_async.stores.forkgate import ForkGate


def closing(gate: ForkGate) -> tuple[threading.Thread, threading.Event]:
    """Close ``gate`` in a thread of its own; the event is set once it is closed."""
    closed = threading.Event()

    def close() -> None:
        gate.close()
        closed.set()

    thread = threading.Thread(target=close, daemon=True)
    thread.start()
    return thread, closed


def calling(gate: ForkGate) -> tuple[threading.Thread, threading.Event]:
    """Make a call through ``gate`` in a thread of its own; the event is set once
    the call got in."""
    entered = threading.Event()

    def call() -> None:
        gate.enter()
        entered.set()
        gate.leave()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, entered


def test_closing_waits_for_the_calls_in_flight_and_holds_back_new_ones() -> None:
    gate = ForkGate("test", wait=10)
    gate.enter()
    closer, closed = closing(gate)
    assert not closed.wait(0.1)  # a call is in flight
    gate.leave()
    assert closed.wait(5)
    caller, entered = calling(gate)
    assert not entered.wait(0.1)  # held back while closed
    gate.open()
    assert entered.wait(5)
    closer.join(5)
    caller.join(5)


def test_two_forks_at_once_keep_the_gate_closed_until_both_are_done() -> None:
    gate = ForkGate("test", wait=10)
    gate.close()
    gate.close()  # another thread forking at the same time
    gate.open()  # the first fork is done
    caller, entered = calling(gate)
    assert not entered.wait(0.1)  # the second fork is not done
    gate.open()
    assert entered.wait(5)
    caller.join(5)


def test_a_call_inside_a_call_goes_on_while_the_gate_waits_to_close() -> None:
    gate = ForkGate("test", wait=10)
    gate.enter()
    closer, closed = closing(gate)
    time.sleep(0.05)
    gate.enter()  # nested: must not wait for the gate, which waits for this thread
    gate.leave()
    assert not closed.is_set()
    gate.leave()
    assert closed.wait(5)
    gate.open()
    closer.join(5)


def test_a_fork_from_inside_a_call_does_not_wait_for_itself() -> None:
    gate = ForkGate("test", wait=10)
    gate.enter()
    started = time.monotonic()
    gate.close()
    assert time.monotonic() - started < 1
    gate.open()
    gate.leave()


def test_closing_gives_up_after_its_wait_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    gate = ForkGate("the library", wait=0.1)
    ready, done = threading.Event(), threading.Event()

    def stuck() -> None:
        gate.enter()
        ready.set()
        done.wait(5)
        gate.leave()

    thread = threading.Thread(target=stuck, daemon=True)
    thread.start()
    assert ready.wait(5)
    with caplog.at_level(logging.WARNING, logger="flask_restful_async.stores.forkgate"):
        started = time.monotonic()
        gate.close()
    assert 0.1 <= time.monotonic() - started < 2
    assert "inside the library" in caplog.text
    gate.open()
    done.set()
    thread.join(5)


def test_the_child_gets_an_open_gate_with_nobody_inside() -> None:
    gate = ForkGate("test", wait=10)
    gate.enter()
    gate.close()
    gate.after_fork_in_child()
    gate.enter()  # not held back
    gate.leave()
    gate.close()  # nobody inside: at once
    gate.open()
