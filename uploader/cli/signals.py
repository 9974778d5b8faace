"""Signals of the CLI: the early handlers (installed before the slow imports, by the package's
first lines), the long commands' stop event, and ``ship``'s two-step interrupt.

Standard library only: this module is imported before typer, SQLAlchemy and fsspec.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

#: Signals that arrived while the command was still starting (before its own handler).
_EARLY_SIGNALS: list[int] = []


def _early_handler(signum: int, _frame: object) -> None:
    """Installed before the slow imports (typer, SQLAlchemy, fsspec): a SIGTERM is remembered and
    honoured by the command's own handler (``recover --loop``, ``watch`` stop cleanly); a SIGINT
    before any work interrupts at once, as usual (nothing was recorded yet)."""
    _EARLY_SIGNALS.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt


def install_early_handlers() -> None:
    """Called by ``python -m uploader.cli`` and the ``uploader`` script before anything slow."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(signum, _early_handler)
        except ValueError:  # not the main thread: the caller owns signals
            return


class _SignalledStop(threading.Event):
    """The long commands' stop event: set by the relay thread, and *seen* at once. A signal
    handled by the main thread right before it asks ``is_set()`` (``watch --once
    --seal-on-exit``, the check after its one pass) must not be missed because the relay thread
    has not run yet: ``signalled`` is written by the handler itself (a plain store, no lock) and
    ``is_set()`` answers from it too. ``wait()`` still wakes through the relay."""

    def __init__(self) -> None:
        super().__init__()
        self.signalled = False

    def is_set(self) -> bool:
        return self.signalled or super().is_set()


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM/SIGINT: long commands finish the work in hand, then stop. A second
    signal exits at once (status 128 + its number): the work in hand may wait on a remote that
    does not answer (a daemon's ``--seal-on-exit`` uploads, a recovery pass's parts), and every
    manifest write is one transaction, so what is recorded is consistent and what is pending
    stays pending for ``uploader recover`` (the leases of a process gone are taken over at once
    on its node, elsewhere when they run out)."""
    stop = _SignalledStop()
    received = [0]
    # The handler never sets ``stop`` itself: it runs on the main thread between two bytecodes,
    # possibly inside ``stop.wait()`` right where that holds the event's own lock (before it
    # waits), and ``stop.set()`` takes that lock: the daemon then never stopped (seen in CI,
    # ``recover --loop`` waiting between passes). It hands the signal to a thread of its own
    # through a SimpleQueue, whose put() is reentrant; that thread sets the event as soon as the
    # main thread lets go of the lock.
    relay: queue.SimpleQueue[bool] = queue.SimpleQueue()

    def relay_signal() -> None:
        if relay.get():
            stop.set()

    def handler(signum: int, _frame: FrameType | None) -> None:
        # A plain write, not rich: the handler runs between any two bytecodes of the main thread,
        # possibly in the middle of rich importing the module its print would need (seen as
        # "cannot import name 'EMOJI' from partially initialized module").
        name = signal.Signals(signum).name
        received[0] += 1
        if received[0] >= 2:
            with contextlib.suppress(OSError):  # (stderr gone: exit all the same)
                os.write(
                    2,
                    f"{name} again: exiting now; the manifest records what was done, "
                    "`uploader recover` finishes what is pending\n".encode(),
                )
            os._exit(128 + signum)
        stop.signalled = True  # seen by is_set() at once
        relay.put(True)  # first: a stderr that is gone must not lose the stop
        with contextlib.suppress(OSError):
            os.write(
                2,
                f"{name}: finishing the work in hand, then stopping (send it again to exit at "
                "once)\n".encode(),
            )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Started here, so that the finally below always ends it (a signal before it starts
        # waits in the queue).
        threading.Thread(target=relay_signal, name="uploader-signal-relay", daemon=True).start()
        if _EARLY_SIGNALS:  # arrived while the command was starting
            handler(_EARLY_SIGNALS[-1], None)
            stop.set()  # not in a handler here: set at once, before the command's first step
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        relay.put(False)  # the relay thread ends (if no signal came)


class _ShipSignals:
    """SIGINT/SIGTERM during ``ship``: the first stops taking new work (the main loop sees
    ``count``), the second exits at once (every manifest write is one transaction, so what is
    recorded is consistent; what is pending stays pending)."""

    def __init__(self) -> None:
        self.count = len(_EARLY_SIGNALS)
        #: Called by the first signal before it says so (``Store.stop_sending``: lock-free).
        self.on_first: Callable[[], None] | None = None

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        if self.count >= 2:
            os.write(
                2,
                b"interrupted again: exiting now; the manifest records what was done, "
                b"`uploader recover` finishes what is pending\n",
            )
            os._exit(130)
        # The first signal only: after it the main thread sets the same event itself
        # (``Store.interrupt``), and a handler landing inside that set() would wait for the
        # lock its own thread holds.
        if self.on_first is not None:
            self.on_first()
        os.write(
            2,
            b"interrupt: no new work is started; parts in flight finish and are recorded "
            b"(interrupt again to exit at once)\n",
        )

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
