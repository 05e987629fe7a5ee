"""als.store.metrics: status-driven gauges, fetch/read histograms, private registries."""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from als.store.metrics import FETCH_KINDS, LATENCY_BUCKETS, Metrics

MiB = 1 << 20
GiB = 1 << 30


def _digest(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def fake_status() -> dict[str, Any]:
    """A status() dict of the documented shape: three layers in different states."""
    return {
        "version": "0.1.0",
        "pid": 4242,
        "root": "/var/lib/als",
        "uptime_s": 3725.5,
        "cache": {
            "dir": "/var/lib/als/cache",
            "bytes": 1288490188,
            "limit_bytes": 10 * GiB,
            "memory_bytes": 40 * MiB,
            "memory_limit_bytes": 64 * MiB,
            "degraded": None,
            "hits": 5,
            "misses": 2,
        },
        "fetched_bytes": 4567,
        "layers": [
            {
                "digest": _digest("one"),
                "toc_digest": _digest("toc one"),
                "refs": ["reg.example/a:1", "reg.example/b:2"],
                "format": "estargz",
                "size": 1000,
                "cached_bytes": 250,
                "cached_percent": 25.0,
                "complete": False,
                "native": False,
                "background": "running",
                "uses": 1,
                "entries": 812,
                "fetched_bytes": 250,
                "read_errors": 0,
                "last_error": None,
            },
            {
                "digest": _digest("two"),
                "toc_digest": _digest("toc two"),
                "refs": ["reg.example/c:3"],
                "format": "zstd:chunked",
                "size": 3 * GiB,
                "cached_bytes": 3 * GiB,
                "cached_percent": 100.0,
                "complete": True,
                "native": True,
                "background": "done",
                "uses": 2,
                "entries": 40000,
                "fetched_bytes": 3 * GiB,
                "read_errors": 0,
                "last_error": None,
            },
            {
                "digest": _digest("three"),
                "toc_digest": _digest("toc three"),
                "refs": [],
                "format": "estargz",
                "size": 5 * MiB,
                "cached_bytes": 0,
                "cached_percent": 0.0,
                "complete": False,
                "native": False,
                "background": "failed",
                "uses": 0,
                "entries": 3,
                "fetched_bytes": 0,
                "read_errors": 3,
                "last_error": "registry answered 503 for bytes 0-4095",
            },
        ],
    }


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, parsed by the reference parser."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_status_gauges_follow_the_status_dict() -> None:
    status = fake_status()
    text = Metrics(lambda: status).render()
    cache = status["cache"]
    assert value(text, "als_cache_bytes") == cache["bytes"]
    assert value(text, "als_cache_limit_bytes") == cache["limit_bytes"]
    assert value(text, "als_memory_cache_bytes") == cache["memory_bytes"]
    assert value(text, "als_cache_hits_total") == cache["hits"]
    assert value(text, "als_cache_misses_total") == cache["misses"]
    assert value(text, "als_cache_degraded") == 0
    assert value(text, "als_layers") == len(status["layers"])
    assert value(text, "als_status_up") == 1
    assert value(text, "als_info", version=status["version"]) == 1
    for layer in status["layers"]:
        d = layer["digest"]
        assert value(text, "als_layer_size_bytes", digest=d) == layer["size"]
        assert value(text, "als_layer_cached_bytes", digest=d) == layer["cached_bytes"]
        assert value(text, "als_layer_uses", digest=d) == layer["uses"]
        assert value(text, "als_layer_complete", digest=d) == (1 if layer["complete"] else 0)
        assert value(text, "als_layer_native", digest=d) == (1 if layer["native"] else 0)
        assert value(text, "als_layer_read_errors_total", digest=d) == layer["read_errors"]


def test_exposition_has_the_literal_sample_lines() -> None:
    status = fake_status()
    text = Metrics(lambda: status).render().decode()
    first = status["layers"][0]
    line = f'als_layer_cached_bytes{{digest="{first["digest"]}"}} {float(first["cached_bytes"])}'
    assert line in text.splitlines()
    assert "# TYPE als_cache_hits_total counter" in text
    assert "# TYPE als_layer_read_errors_total counter" in text
    assert "# TYPE als_cache_bytes gauge" in text


def test_status_fn_is_called_at_every_scrape() -> None:
    status = fake_status()
    calls = []

    def status_fn() -> dict[str, Any]:
        calls.append(1)
        return status

    m = Metrics(status_fn)
    assert calls == []
    first = m.render()
    status["cache"]["degraded"] = "disk full (ENOSPC writing a chunk)"
    status["cache"]["bytes"] += 4096
    status["layers"] = status["layers"][:1]
    second = m.render()
    assert len(calls) == 2
    assert value(first, "als_cache_degraded") == 0
    assert value(second, "als_cache_degraded") == 1
    assert value(second, "als_cache_bytes") == value(first, "als_cache_bytes") + 4096
    gone = fake_status()["layers"][1]["digest"]
    assert ("als_layer_uses", frozenset({("digest", gone)})) in samples(first)
    assert ("als_layer_uses", frozenset({("digest", gone)})) not in samples(second)


def test_fetch_histogram_and_byte_counter_per_kind() -> None:
    m = Metrics(fake_status)
    m.observe_fetch("foreground", 0.0002, 4096)
    m.observe_fetch("foreground", 0.3, 1 << 20)
    m.observe_fetch("background", 12.0, 4 << 20)
    text = m.render()
    assert value(text, "als_registry_fetch_seconds_count", kind="foreground") == 2
    assert math.isclose(
        value(text, "als_registry_fetch_seconds_sum", kind="foreground"), 0.0002 + 0.3
    )
    assert value(text, "als_registry_fetch_seconds_count", kind="background") == 1
    # Every kind is exported from the start, even with nothing observed.
    assert value(text, "als_registry_fetch_seconds_count", kind="prefetch") == 0
    assert value(text, "als_registry_fetched_bytes_total", kind="foreground") == 4096 + (1 << 20)
    assert value(text, "als_registry_fetched_bytes_total", kind="background") == 4 << 20
    assert value(text, "als_registry_fetched_bytes_total", kind="prefetch") == 0
    # Buckets are cumulative: 0.2 ms is above the first bound, inside the second.
    b0, b1 = (str(b) for b in LATENCY_BUCKETS[:2])
    assert value(text, "als_registry_fetch_seconds_bucket", kind="foreground", le=b0) == 0
    assert value(text, "als_registry_fetch_seconds_bucket", kind="foreground", le=b1) == 1
    assert value(text, "als_registry_fetch_seconds_bucket", kind="foreground", le="+Inf") == 2
    assert value(text, "als_registry_fetch_seconds_bucket", kind="background", le="10.0") == 0
    assert value(text, "als_registry_fetch_seconds_bucket", kind="background", le="30.0") == 1


def test_buckets_span_a_tenth_of_a_millisecond_to_a_minute() -> None:
    assert LATENCY_BUCKETS[0] == pytest.approx(0.0001)
    assert LATENCY_BUCKETS[-1] == 60.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_read_histogram() -> None:
    m = Metrics(fake_status)
    for s in (0.00005, 0.002, 0.002, 1.5):
        m.observe_read(s)
    text = m.render()
    assert value(text, "als_fuse_read_seconds_count") == 4
    assert math.isclose(value(text, "als_fuse_read_seconds_sum"), 0.00005 + 0.004 + 1.5)
    assert value(text, "als_fuse_read_seconds_bucket", le="0.0001") == 1
    assert value(text, "als_fuse_read_seconds_bucket", le="0.0025") == 3
    assert value(text, "als_fuse_read_seconds_bucket", le="+Inf") == 4


def test_unknown_fetch_kind_is_refused() -> None:
    m = Metrics(fake_status)
    with pytest.raises(ValueError, match="'sideways'"):
        m.observe_fetch("sideways", 0.1, 10)
    assert set(FETCH_KINDS) == {"foreground", "readahead", "prefetch", "background"}


def test_registries_are_private() -> None:
    a, b = Metrics(fake_status), Metrics(fake_status)
    a.observe_read(0.01)
    assert value(a.render(), "als_fuse_read_seconds_count") == 1
    assert value(b.render(), "als_fuse_read_seconds_count") == 0
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "als_" not in global_text


def test_failing_status_fn_still_renders() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("manager lock poisoned")

    m = Metrics(broken)
    m.observe_read(0.01)
    text = m.render()
    assert value(text, "als_status_up") == 0
    assert value(text, "als_fuse_read_seconds_count") == 1
    assert b"als_cache_bytes" not in text


def test_missing_and_odd_fields_count_as_zero() -> None:
    status = fake_status()
    odd = copy.deepcopy(status["layers"][0])
    odd["digest"] = _digest("odd")
    del odd["size"]
    odd["uses"] = None
    odd["cached_bytes"] = "lots"
    status["layers"].append(odd)
    status["layers"].append("not a layer")
    del status["cache"]["hits"]
    text = Metrics(lambda: status).render()
    assert value(text, "als_layer_size_bytes", digest=odd["digest"]) == 0
    assert value(text, "als_layer_uses", digest=odd["digest"]) == 0
    assert value(text, "als_layer_cached_bytes", digest=odd["digest"]) == 0
    assert value(text, "als_cache_hits_total") == 0
    assert value(text, "als_layers") == len(fake_status()["layers"]) + 1


def test_content_type_is_the_text_format() -> None:
    m = Metrics(fake_status)
    assert m.content_type.startswith("text/plain")
    assert "version=" in m.content_type


def test_observations_before_the_first_scrape_are_all_exported() -> None:
    m = Metrics(fake_status)
    for _ in range(1000):
        m.observe_read(0.0003)
        m.observe_fetch("readahead", 0.02, 100)
    first = m.render()
    m.observe_read(100.0)  # above the last bound: only in +Inf
    second = m.render()
    assert value(first, "als_fuse_read_seconds_count") == 1000
    assert value(first, "als_registry_fetched_bytes_total", kind="readahead") == 100_000
    assert value(second, "als_fuse_read_seconds_bucket", le="60.0") == 1000
    assert value(second, "als_fuse_read_seconds_bucket", le="+Inf") == 1001
    assert math.isclose(value(second, "als_fuse_read_seconds_sum"), 0.3 + 100.0)
