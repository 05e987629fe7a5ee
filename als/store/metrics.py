"""Prometheus metrics for the store: latency histograms plus gauges read from ``status()``.

Histograms are fed by the code doing the work (``observe_fetch`` / ``observe_read``) and kept
here as plain bucket counts; everything else is taken from the manager's ``status()`` dict when
Prometheus scrapes, so the numbers can never drift from what ``als status`` shows.

``prometheus_client`` (about 1.5 MB of the daemon's memory) is imported at the first scrape,
never by a daemon nobody scrapes. Each :class:`Metrics` then builds a private
:class:`prometheus_client.CollectorRegistry` (never the process-global one), so a test can
create as many as it likes and two daemons in one process cannot clash.

Only this module imports ``prometheus_client``.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from als.store.status import StoreStatus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

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


class _StatusCollector:
    """Turns one ``status()`` call per scrape into gauges and counters."""

    def __init__(self, status_fn: StatusFn) -> None:
        self._status_fn = status_fn

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

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
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

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


class _Histogram:
    """Observations in LATENCY_BUCKETS: per-bucket counts (the last one is +Inf) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # A bucket holds the values up to and including its bound (Prometheus' "le").
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


class _ObservedCollector:
    """The histograms and byte counters of one :class:`Metrics`, at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily

        m = self._m
        fetch = HistogramMetricFamily(
            "als_registry_fetch_seconds",
            "Time to fetch one range request from a registry",
            labels=["kind"],
        )
        for kind, h in m.fetch_seconds.items():
            fetch.add_metric([kind], h.cumulative(), h.sum)
        yield fetch
        fetched = CounterMetricFamily(
            "als_registry_fetched_bytes", "Bytes received from registries", labels=["kind"]
        )
        for kind, n in m.fetched_bytes.items():
            fetched.add_metric([kind], float(n))
        yield fetched
        read = HistogramMetricFamily("als_fuse_read_seconds", "Time to answer one FUSE read")
        read.add_metric([], m.read_seconds.cumulative(), m.read_seconds.sum)
        yield read


class Metrics:
    """The store's metrics. ``status_fn`` is called once per scrape, on the scraping thread."""

    def __init__(self, status_fn: StatusFn) -> None:
        self._status_fn = status_fn
        # Every kind from the start (zeros), so that rate() works at once.
        self.fetch_seconds = {kind: _Histogram() for kind in FETCH_KINDS}
        self.fetched_bytes = dict.fromkeys(FETCH_KINDS, 0)
        self.read_seconds = _Histogram()
        self._registry: CollectorRegistry | None = None

    @property
    def content_type(self) -> str:
        from prometheus_client import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST

    def observe_fetch(self, kind: str, seconds: float, nbytes: int) -> None:
        """Record one registry fetch of ``nbytes`` taking ``seconds``."""
        if kind not in FETCH_KINDS:
            raise ValueError(f"fetch kind {kind!r} is not one of {', '.join(FETCH_KINDS)}")
        self.fetch_seconds[kind].observe(seconds)
        if nbytes > 0:
            self.fetched_bytes[kind] += nbytes

    def observe_read(self, seconds: float) -> None:
        """Record the latency of one FUSE read."""
        self.read_seconds.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_ObservedCollector(self))
            registry.register(_StatusCollector(self._status_fn))
            self._registry = registry
        return generate_latest(self._registry)
