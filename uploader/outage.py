"""Daemons ride out manifest outages.

The long-running loops (:meth:`uploader.watch.Watcher.run`, :func:`uploader.recovery.recover_loop`,
:func:`uploader.verify.scrub_loop`) run one pass after another. A pass that fails because the
manifest is unavailable for a while (:func:`uploader.manifest.db.is_outage`: a connection lost or
refused, a server restarting, an SQLite file locked past its busy timeout) does not end the loop:
one line is logged, the loop waits a bounded, jittered, growing delay and runs the pass again.
Anything else (a configuration error such as a wrong URL or a schema behind head, a bug) still
ends it.

Nothing is lost by giving up a pass half-way: every manifest write is one transaction, so what was
recorded is consistent and what was not is still to do. Leases held when the outage began may
expire meanwhile (another worker may take those segments, as after a crash); the next pass claims
or re-acquires what is free again.

Waiting is ``stop.wait(delay)``: a SIGTERM ends the wait at once, and a test injects time by
passing an event whose ``wait`` records the delay instead of sleeping (and a ``clock``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from uploader.manifest import db

log = logging.getLogger("uploader.outage")

#: The first wait after a failed pass, and the most any wait grows to (seconds).
FIRST_DELAY = 0.5
MAX_DELAY = 30.0


class Backoff:
    """Growing waits between attempts: ``first * 2**n`` capped at ``cap``, each drawn between half
    and all of that ("equal jitter": never a hot loop, and daemons that lost the same server do
    not come back in step)."""

    def __init__(
        self,
        *,
        first: float = FIRST_DELAY,
        cap: float = MAX_DELAY,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap, got first={first}, cap={cap}")
        self.first = first
        self.cap = cap
        self.rng = rng
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.first * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return ceiling * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.attempt = 0


class OutageGuard:
    """One loop's view of the manifest's availability: says when an outage starts (one line per
    failed attempt) and when it ends, and backs off in between."""

    def __init__(
        self,
        what: str,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.since: float | None = None  # when the current outage began (None: no outage)
        self.failures = 0  # failed attempts of the current outage
        self.outages = 0  # outages seen so far

    def survive(self, exc: BaseException, stop: threading.Event) -> bool:
        """If ``exc`` is a manifest outage: log one line, wait (until ``stop``), return True for
        the caller to try again. Anything else: False, and the caller re-raises it."""
        if not db.is_outage(exc):
            return False
        now = self.clock()
        if self.since is None:
            self.since = now
            self.outages += 1
        self.failures += 1
        delay = self.backoff.next()
        log.warning(
            "%s: manifest unavailable (%s); retrying in %.1f s (attempt %d, %.0f s into the outage)",
            self.what,
            db.describe(exc),
            delay,
            self.failures,
            now - self.since,
        )
        stop.wait(delay)
        return True

    def ok(self) -> None:
        """A pass went through: an outage going on is over."""
        if self.since is None:
            return
        log.warning(
            "%s: manifest reachable again after %.1f s (%d failed attempt(s)); carrying on",
            self.what,
            self.clock() - self.since,
            self.failures,
        )
        self.since = None
        self.failures = 0
        self.backoff.reset()
