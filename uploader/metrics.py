"""Prometheus metrics for ``watch`` and ``recover --loop`` (``--metrics-port``).

Counters of what this process did (bytes uploaded, failures, retries) are kept here; gauges of the
manifest (segments and commits by state, unverified bytes, oldest unverified age) and of the remote
(unfinished uploads under the root) are read when Prometheus scrapes, so they are never stale.
Each collector fails on its own: the endpoint always answers 200 with the series that could be
read, and counts the failure in ``collector_errors_total``.
The remote listing is cached for ``listing_ttl`` seconds: it costs a request per scrape otherwise.

Series (all prefixed ``uploader_``):

=====================================  =======  ==================================================
``bytes_uploaded_total``               counter  bytes this process sent to the remote
``failures_total{kind}``               counter  failed commits, seals, recoveries (by kind)
``retries_total``                      counter  remote requests retried after a retryable error
``checked_total``                      counter  verified objects checked again (verify, scrub)
``drift_total``                        counter  verified objects found missing or different
``collector_errors_total{collector}``  counter  scrapes in which a collector failed (its series left out)
``segments{state}``                    gauge    segments in the manifest by state
``commits{state}``                     gauge    commits (parts) in the manifest by state
``unverified_bytes``                   gauge    bytes committed but not yet verified
``oldest_unverified_seconds``          gauge    since the oldest sealed, unverified segment was sealed (open ones left out)
``unfinished_uploads``                 gauge    multipart uploads under the remote root
``stalled_segments``                   gauge    open segments of this node whose local file vanished or shrank
=====================================  =======  ==================================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from uploader.store import Store

log = logging.getLogger(__name__)

#: The collectors, each failing on its own: this process's counters, the manifest's gauges, the
#: remote's listing.
COLLECTORS = ("process", "manifest", "remote")


class Metrics(Collector):
    """Collects the ``uploader_*`` series for one store."""

    def __init__(self, store: Store, *, listing_ttl: float = 30.0) -> None:
        self.store = store
        self.listing_ttl = listing_ttl
        self._lock = threading.Lock()
        self.bytes_uploaded = 0
        self.failures: dict[str, int] = {}
        self.checked = 0
        self.drift = 0
        self._uploads: tuple[float, int] | None = None
        #: Scrapes in which each collector failed, and the last error of those failing now.
        self.collector_errors: dict[str, int] = {}
        self._last_error: dict[str, str] = {}

    def uploaded(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_uploaded += nbytes

    def failed(self, kind: str, count: int = 1) -> None:
        with self._lock:
            self.failures[kind] = self.failures.get(kind, 0) + count

    def verified_again(self, ok: bool) -> None:
        """One verified object checked again (``ok``: it still matched)."""
        with self._lock:
            self.checked += 1
            self.drift += 0 if ok else 1

    def _unfinished_uploads(self) -> int:
        now = time.monotonic()
        cached = self._uploads
        if cached is not None and now - cached[0] < self.listing_ttl:
            return cached[1]
        count = len(self.store.storage.list_uploads())
        self._uploads = (now, count)
        return count

    def collect(self) -> Iterable[Metric]:
        """Every collector on its own: one that raises (the manifest unreachable, the remote
        refusing ListMultipartUploads) leaves its series out of this scrape, counts in
        ``uploader_collector_errors_total{collector}`` and is logged once per new error; the
        other series are still answered (HTTP 200)."""
        families: list[Metric] = []
        for name, collector in (
            ("process", self._process),
            ("manifest", self._manifest),
            ("remote", self._remote),
        ):
            try:
                families.extend(collector())
            except Exception as exc:  # any failure: the scrape must still answer
                self._collector_failed(name, exc)
            else:
                self._collector_ok(name)
        with self._lock:
            errors = dict(self.collector_errors)
        e = CounterMetricFamily(
            "uploader_collector_errors",
            "Scrapes in which a collector failed (its series were left out)",
            labels=["collector"],
        )
        for name in COLLECTORS:
            e.add_metric([name], errors.get(name, 0))
        families.append(e)
        return families

    def _collector_failed(self, name: str, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.collector_errors[name] = self.collector_errors.get(name, 0) + 1
            new = self._last_error.get(name) != text
            self._last_error[name] = text
        if new:  # one line per new error, not a traceback per scrape
            log.warning(
                "metrics: the %s collector failed, its series are left out until it works "
                "again (counted in uploader_collector_errors_total): %s",
                name,
                text,
            )

    def _collector_ok(self, name: str) -> None:
        with self._lock:
            was = self._last_error.pop(name, None)
        if was is not None:
            log.info("metrics: the %s collector works again", name)

    def _process(self) -> list[Metric]:
        """What this process did (kept in memory)."""
        with self._lock:
            uploaded = self.bytes_uploaded
            failures = dict(self.failures)
            checked, drift = self.checked, self.drift
        c = CounterMetricFamily("uploader_bytes_uploaded", "Bytes this process sent to the remote")
        c.add_metric([], uploaded)
        f = CounterMetricFamily(
            "uploader_failures", "Failed commits, seals and recoveries", labels=["kind"]
        )
        for kind in sorted({"commit", "seal", "recovery", *failures}):
            f.add_metric([kind], failures.get(kind, 0))
        ch = CounterMetricFamily("uploader_checked", "Verified objects checked again")
        ch.add_metric([], checked)
        d = CounterMetricFamily("uploader_drift", "Verified objects found missing or different")
        d.add_metric([], drift)
        r = CounterMetricFamily("uploader_retries", "Remote requests retried")
        r.add_metric([], float(getattr(self.store.storage, "retries", 0)))
        return [c, f, ch, d, r]

    def _manifest(self) -> list[Metric]:
        """The manifest's gauges, read now (one status query)."""
        status = self.store.status()
        s = GaugeMetricFamily("uploader_segments", "Segments by state", labels=["state"])
        for state, n in status.segments.items():
            s.add_metric([state], n)
        cm = GaugeMetricFamily("uploader_commits", "Commits (parts) by state", labels=["state"])
        for state, n in status.commits.items():
            cm.add_metric([state], n)
        return [
            s,
            cm,
            GaugeMetricFamily(
                "uploader_unverified_bytes",
                "Bytes committed but not yet verified",
                value=status.unverified_bytes,
            ),
            GaugeMetricFamily(
                "uploader_oldest_unverified_seconds",
                "Seconds since the oldest segment sealed but not verified was sealed (open "
                "segments are left out: a quiet writer is not stuck)",
                value=status.oldest_sealed_age or 0.0,
            ),
            GaugeMetricFamily(
                "uploader_stalled_segments",
                "Open segments of this node whose local file vanished or shrank",
                value=len(status.stalled),
            ),
        ]

    def _remote(self) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "uploader_unfinished_uploads",
                "Multipart uploads under the remote root",
                value=self._unfinished_uploads(),
            )
        ]


def serve(metrics: Metrics, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``metrics`` over HTTP on ``addr:port``; returns the server (``shutdown()`` stops it)."""
    registry = CollectorRegistry()
    registry.register(metrics)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
