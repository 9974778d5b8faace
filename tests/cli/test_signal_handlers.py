"""The CLI's signal handlers run on the main thread between any two bytecodes, so they must not
take a lock that thread may hold at that moment. A SIGTERM landing in ``recover --loop`` right as
its wait between passes entered ``stop.wait()`` (which holds the event's lock until it starts
waiting) used to call ``stop.set()`` there, wait for that very lock, and never stop (seen in CI:
the daemon's stack ended in ``signals.handler`` -> ``Event.set`` inside ``Event.wait``).

Each test calls the installed handler on a thread that holds the lock in question, as the main
thread would: the handler must return (no deadlock), and the event must be set once the lock is
let go."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import Any

from uploader.cli import signals as signals_mod
from uploader.cli.signals import _ShipSignals, _stop_on_signals


def _returns_while_holding(lock: Any, call: Callable[[], None]) -> bool:
    """Whether ``call`` returns on a thread holding ``lock`` (False: it deadlocked there)."""
    done = threading.Event()

    def run() -> None:
        with lock:
            call()
        done.set()

    threading.Thread(target=run, daemon=True).start()  # a deadlocked one is left behind
    return done.wait(10)


def _relays() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "uploader-signal-relay"]


def test_sigterm_inside_the_stop_events_own_wait_stops_the_loop(monkeypatch: Any) -> None:
    monkeypatch.setattr(signals_mod, "_EARLY_SIGNALS", [])  # no signal "before" this one
    with _stop_on_signals() as stop:
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        # What Event.wait holds between its start and the moment it waits: the event's lock.
        lock = stop._cond  # type: ignore[attr-defined]
        assert _returns_while_holding(lock, lambda: handler(signal.SIGTERM, None))
        assert stop.wait(10), "the signal did not stop the loop"
    for t in _relays():
        t.join(10)
    assert _relays() == []  # the relay thread ended with the context


def test_the_relay_thread_ends_with_the_context_when_no_signal_came(monkeypatch: Any) -> None:
    monkeypatch.setattr(signals_mod, "_EARLY_SIGNALS", [])
    for _ in range(3):
        with _stop_on_signals() as stop:
            assert len(_relays()) == 1
        for t in _relays():
            t.join(10)
        assert _relays() == [] and not stop.is_set()


def test_the_second_interrupt_of_ship_exits_without_touching_the_stop_event(
    monkeypatch: Any,
) -> None:
    exits: list[int] = []

    class Exited(BaseException):
        pass

    def _exit(code: int) -> None:  # like os._exit, it does not return
        exits.append(code)
        raise Exited

    def second() -> None:
        with contextlib.suppress(Exited):
            signals.handler(signal.SIGINT, None)

    monkeypatch.setattr("os._exit", _exit)
    sending = threading.Event()  # stands for the store's transport.stop
    signals = _ShipSignals()
    signals.on_first = sending.set
    signals.handler(signal.SIGINT, None)
    assert sending.is_set() and exits == []
    # The main thread now interrupts the store, setting that event itself; a second signal
    # landing inside that set() must not set it again (its lock is held by the same thread).
    lock = sending._cond  # type: ignore[attr-defined]
    assert _returns_while_holding(lock, second)
    assert exits == [130]


def test_a_signal_is_seen_by_is_set_before_the_relay_thread_runs(monkeypatch: Any) -> None:
    """``watch --once --seal-on-exit`` asks ``stop.is_set()`` right after its pass: a SIGTERM
    handled just before that must be seen then, not once the relay thread gets to run."""
    monkeypatch.setattr(signals_mod, "_EARLY_SIGNALS", [])
    with _stop_on_signals() as stop:
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        # The relay thread cannot set the event while this lock is held (set() takes it).
        with stop._cond:  # type: ignore[attr-defined]
            assert not stop.is_set()
            handler(signal.SIGTERM, None)
            assert stop.is_set(), "the signal was not seen until the relay thread ran"
        assert stop.wait(10)
