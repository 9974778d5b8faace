"""Prometheus metrics for ``watch`` and ``recover --loop`` (``--metrics-port``).

Counters of what this process did (bytes uploaded, failures, retries) are kept here; gauges of the
manifest (segments and commits by state, unverified bytes, oldest unverified age) and of the remote
(unfinished uploads under the root) are read when Prometheus scrapes, so they are never stale.
The remote listing is cached for ``listing_ttl`` seconds: it costs a request per scrape otherwise.

Series (all prefixed ``uploader_``):

==================================  ======  ==================================================
``bytes_uploaded_total``            counter bytes this process sent to the remote
``failures_total{kind}``            counter failed commits, seals, recoveries (by kind)
``retries_total``                   counter remote requests retried after a retryable error
``checked_total``                   counter verified objects checked again (verify, scrub)
``drift_total``                     counter verified objects found missing or different
``segments{state}``                 gauge   segments in the manifest by state
``commits{state}``                  gauge   commits (parts) in the manifest by state
``unverified_bytes``                gauge   bytes committed but not yet verified
``oldest_unverified_seconds``       gauge   age of the oldest unfinished segment (0 if none)
``unfinished_uploads``              gauge   multipart uploads under the remote root
``stalled_segments``                gauge   open segments of this node whose local file vanished or shrank
==================================  ======  ==================================================
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from uploader.store import Store


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
        with self._lock:
            uploaded = self.bytes_uploaded
            failures = dict(self.failures)
            checked, drift = self.checked, self.drift
        c = CounterMetricFamily("uploader_bytes_uploaded", "Bytes this process sent to the remote")
        c.add_metric([], uploaded)
        yield c
        f = CounterMetricFamily(
            "uploader_failures", "Failed commits, seals and recoveries", labels=["kind"]
        )
        for kind in sorted({"commit", "seal", "recovery", *failures}):
            f.add_metric([kind], failures.get(kind, 0))
        yield f
        ch = CounterMetricFamily("uploader_checked", "Verified objects checked again")
        ch.add_metric([], checked)
        yield ch
        d = CounterMetricFamily("uploader_drift", "Verified objects found missing or different")
        d.add_metric([], drift)
        yield d
        r = CounterMetricFamily("uploader_retries", "Remote requests retried")
        r.add_metric([], float(getattr(self.store.storage, "retries", 0)))
        yield r

        status = self.store.status()
        s = GaugeMetricFamily("uploader_segments", "Segments by state", labels=["state"])
        for state, n in status.segments.items():
            s.add_metric([state], n)
        yield s
        cm = GaugeMetricFamily("uploader_commits", "Commits (parts) by state", labels=["state"])
        for state, n in status.commits.items():
            cm.add_metric([state], n)
        yield cm
        yield GaugeMetricFamily(
            "uploader_unverified_bytes",
            "Bytes committed but not yet verified",
            value=status.unverified_bytes,
        )
        yield GaugeMetricFamily(
            "uploader_oldest_unverified_seconds",
            "Age of the oldest unfinished segment",
            value=status.oldest_unverified_age or 0.0,
        )
        yield GaugeMetricFamily(
            "uploader_stalled_segments",
            "Open segments of this node whose local file vanished or shrank",
            value=len(status.stalled),
        )
        yield GaugeMetricFamily(
            "uploader_unfinished_uploads",
            "Multipart uploads under the remote root",
            value=self._unfinished_uploads(),
        )


def serve(metrics: Metrics, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``metrics`` over HTTP on ``addr:port``; returns the server (``shutdown()`` stops it)."""
    registry = CollectorRegistry()
    registry.register(metrics)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
