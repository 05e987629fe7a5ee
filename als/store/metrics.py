"""Prometheus metrics for the store: latency histograms plus gauges read from ``status()``.

Each :class:`Metrics` owns a private :class:`prometheus_client.CollectorRegistry` (never the
process-global one), so a test can create as many as it likes and two daemons in one process
cannot clash. Histograms are fed by the code doing the work (``observe_fetch`` /
``observe_read``); everything else is taken from the manager's ``status()`` dict when
Prometheus scrapes, so the numbers can never drift from what ``als status`` shows.

Only this module and :mod:`als.store.control` import ``prometheus_client``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from als.store.status import StoreStatus

log = logging.getLogger("als.metrics")

#: The manager's ``status()``. Read defensively: any mapping is accepted, a missing or
#: mistyped field counts as 0 (a broken status must not break every scrape).
StatusFn = Callable[[], StoreStatus | Mapping[str, Any]]

#: Why a byte range was fetched from a registry.
FETCH_KINDS = ("foreground", "readahead", "prefetch", "background")

#: 0.1 ms (a page-cache-warm FUSE read) up to 60 s (a whole layer over a slow link).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def _num(value: Any) -> float:
    """A status field as a float; missing or non-numeric values count as 0."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return 0.0


class _StatusCollector(Collector):
    """Turns one ``status()`` call per scrape into gauges and counters."""

    def __init__(self, status_fn: StatusFn) -> None:
        self._status_fn = status_fn

    def collect(self) -> Iterable[Metric]:
        try:
            status = self._status_fn()
        except Exception:
            # A broken status() must not turn every scrape into a 500: export what we can.
            log.exception("status() failed while collecting metrics")
            up = GaugeMetricFamily("als_status_up", "1 if status() answered at this scrape")
            up.add_metric([], 0.0)
            return [up]
        return list(self._families(status))

    def _families(self, status: StoreStatus | Mapping[str, Any]) -> Iterable[Metric]:
        up = GaugeMetricFamily("als_status_up", "1 if status() answered at this scrape")
        up.add_metric([], 1.0)
        yield up

        info = GaugeMetricFamily("als_info", "Build information", labels=["version"])
        info.add_metric([str(status.get("version", ""))], 1.0)
        yield info
        yield GaugeMetricFamily(
            "als_uptime_seconds",
            "Seconds since the daemon started",
            value=_num(status.get("uptime_s")),
        )

        cache: Mapping[str, Any] = status.get("cache") or {}
        yield GaugeMetricFamily(
            "als_cache_bytes", "Bytes in the on-disk cache", value=_num(cache.get("bytes"))
        )
        yield GaugeMetricFamily(
            "als_cache_limit_bytes",
            "Size limit of the on-disk cache",
            value=_num(cache.get("limit_bytes")),
        )
        yield GaugeMetricFamily(
            "als_memory_cache_bytes",
            "Bytes of decompressed chunks held in memory",
            value=_num(cache.get("memory_bytes")),
        )
        yield GaugeMetricFamily(
            "als_memory_cache_limit_bytes",
            "Size limit of the memory cache",
            value=_num(cache.get("memory_limit_bytes")),
        )
        yield CounterMetricFamily(
            "als_cache_hits", "Cache lookups that found the data", value=_num(cache.get("hits"))
        )
        yield CounterMetricFamily(
            "als_cache_misses",
            "Cache lookups that had to fetch",
            value=_num(cache.get("misses")),
        )
        yield GaugeMetricFamily(
            "als_cache_degraded",
            "1 if the on-disk cache is disabled or read-only (see als status for why)",
            value=0.0 if cache.get("degraded") is None else 1.0,
        )

        requests = CounterMetricFamily(
            "als_fuse_requests", "FUSE requests answered, by operation", labels=["op"]
        )
        fuse: Mapping[str, Any] = status.get("fuse_requests") or {}
        for op, n in sorted(fuse.items()):
            requests.add_metric([str(op)], _num(n))
        yield requests

        layers = [la for la in status.get("layers") or [] if isinstance(la, Mapping)]
        yield GaugeMetricFamily("als_layers", "Layers the store knows about", value=len(layers))
        per_layer = (
            (GaugeMetricFamily, "als_layer_size_bytes", "Compressed blob size", "size"),
            (GaugeMetricFamily, "als_layer_cached_bytes", "Blob bytes cached", "cached_bytes"),
            (GaugeMetricFamily, "als_layer_uses", "Mounts using the layer", "uses"),
            (GaugeMetricFamily, "als_layer_complete", "1 if fully cached", "complete"),
            (GaugeMetricFamily, "als_layer_native", "1 if unpacked for overlay", "native"),
            (CounterMetricFamily, "als_layer_read_errors", "Reads that failed", "read_errors"),
        )
        for family_type, name, doc, key in per_layer:
            fam = family_type(name, doc, labels=["digest"])
            for layer in layers:
                fam.add_metric([str(layer.get("digest", ""))], _num(layer.get(key)))
            yield fam


class Metrics:
    """The store's metrics. ``status_fn`` is called once per scrape, on the scraping thread."""

    content_type: str = CONTENT_TYPE_LATEST

    def __init__(self, status_fn: StatusFn) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._fetch_seconds = Histogram(
            "als_registry_fetch_seconds",
            "Time to fetch one range request from a registry",
            labelnames=["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._fetched_bytes = Counter(
            "als_registry_fetched_bytes",
            "Bytes received from registries",
            labelnames=["kind"],
            registry=self.registry,
        )
        self._read_seconds = Histogram(
            "als_fuse_read_seconds",
            "Time to answer one FUSE read",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for kind in FETCH_KINDS:  # export zeros from the start, so rate() works at once
            self._fetch_seconds.labels(kind=kind)
            self._fetched_bytes.labels(kind=kind)
        self.registry.register(_StatusCollector(status_fn))

    def observe_fetch(self, kind: str, seconds: float, nbytes: int) -> None:
        """Record one registry fetch of ``nbytes`` taking ``seconds``."""
        if kind not in FETCH_KINDS:
            raise ValueError(f"fetch kind {kind!r} is not one of {', '.join(FETCH_KINDS)}")
        self._fetch_seconds.labels(kind=kind).observe(seconds)
        if nbytes > 0:
            self._fetched_bytes.labels(kind=kind).inc(nbytes)

    def observe_read(self, seconds: float) -> None:
        """Record the latency of one FUSE read."""
        self._read_seconds.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return _generate_latest(self.registry)
