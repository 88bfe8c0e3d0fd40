"""Counters the fetch path keeps, and the opt-in Prometheus endpoint that exposes them.

The fetch path only ever touches plain Python integers and one small histogram
(:class:`FetchCounters`); nothing here costs more than an attribute increment when metrics are
off, and ``prometheus_client`` is imported only by :func:`start_exporter`, i.e. only when
``--metrics`` / ``TTFS_METRICS`` is given (the mount daemon's start-up must not pay for it).

The exporter is a custom collector: each scrape reads a :class:`MetricsSnapshot` from the
process's fetcher (a few integer reads, done from the HTTP server's thread; CPython's GIL
makes each read atomic, and a scrape that sees a counter one increment early is harmless).
Names, labels and meaning: docs/configuration.md, "Metrics".
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import ConfigError

log = logging.getLogger(__name__)

DEMAND_BUCKETS = (
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
)
"""Upper bounds (seconds) of the demand-read latency histogram: a page-cache-speed hit of the
block store (~1 ms) to a read that waited out retries (30 s)."""


class LatencyHistogram:
    """A fixed-bucket histogram: ``observe`` is one bisect and three increments."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = DEMAND_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(upper bound, observations <= it), ..., ("+Inf", all)]`` (Prometheus' shape)."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class FetchCounters:
    """What a fetcher counts beyond its byte and request totals (see :class:`MetricsSnapshot`)."""

    local_bytes: int = 0
    blobs_verified: int = 0
    blobs_failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    demand_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """One scrape's values, read from a fetcher by its ``metrics_snapshot()``."""

    origin_bytes: int
    shared_bytes: int
    local_bytes: int
    origin_requests: int
    shared_requests: int
    retries: int
    errors: dict[str, int]
    blobs_verified: int
    blobs_failed: int
    inflight_requests: int
    queued: dict[str, int]
    demand_buckets: list[tuple[str, int]]
    demand_count: int
    demand_sum: float

    @classmethod
    def empty(cls) -> MetricsSnapshot:
        """All zeros: a mount before its fetcher is attached."""
        return cls(
            origin_bytes=0,
            shared_bytes=0,
            local_bytes=0,
            origin_requests=0,
            shared_requests=0,
            retries=0,
            errors={},
            blobs_verified=0,
            blobs_failed=0,
            inflight_requests=0,
            queued={},
            demand_buckets=LatencyHistogram().cumulative(),
            demand_count=0,
            demand_sum=0.0,
        )


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (then 127.0.0.1) as (host, port).

    Raises:
        ConfigError: not an address with a port in 1-65535.
    """
    raw = text.strip()
    host, sep, port = raw.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", raw
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise ConfigError(f"metrics address {text!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    return host, number


class Exporter:
    """A running Prometheus endpoint; :meth:`close` stops it."""

    def __init__(self, server: object, address: str) -> None:
        self._server = server
        self.address = address

    def close(self) -> None:
        server = self._server
        shutdown = getattr(server, "shutdown", None)
        if shutdown is not None:
            shutdown()
            server.server_close()  # type: ignore[attr-defined]


def start_exporter(
    address: str, snapshot: Callable[[], MetricsSnapshot], *, role: str, version: str
) -> Exporter:
    """Serve ``/metrics`` at ``address`` from a thread, reading ``snapshot()`` per scrape.

    Raises:
        ConfigError: prometheus_client is missing, or the address cannot be bound.
    """
    host, port = parse_address(address)
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
    except ImportError as e:
        raise ConfigError(
            f"--metrics needs prometheus_client: pip install 'ttfs[metrics]' ({e})"
        ) from None

    class Collector:
        def collect(self) -> object:
            s = snapshot()
            info = GaugeMetricFamily(
                "ttfs_info", "This ttfs process (constant 1).", labels=["role", "version"]
            )
            info.add_metric([role, version], 1)
            yield info
            by_source = CounterMetricFamily(
                "ttfs_bytes",
                "Bytes of model data by where they came from: fetched from the origin, read "
                "from the shared (b10fs) cache, or already in the local block store when the "
                "blob was opened.",
                labels=["source"],
            )
            by_source.add_metric(["origin"], s.origin_bytes)
            by_source.add_metric(["shared"], s.shared_bytes)
            by_source.add_metric(["local"], s.local_bytes)
            yield by_source
            requests = CounterMetricFamily(
                "ttfs_requests", "Ranged reads started, by source.", labels=["source"]
            )
            requests.add_metric(["origin"], s.origin_requests)
            requests.add_metric(["shared"], s.shared_requests)
            yield requests
            yield CounterMetricFamily(
                "ttfs_retries", "Ranged reads retried after a transient error.", value=s.retries
            )
            errors = CounterMetricFamily(
                "ttfs_errors",
                "Failed reads and checks by kind (http_503, timeout, network, short_body, "
                "IntegrityError, ...), retried or not.",
                labels=["kind"],
            )
            for kind, n in sorted(s.errors.items()):
                errors.add_metric([kind], n)
            yield errors
            verified = CounterMetricFamily(
                "ttfs_blobs_verified", "Blobs whose content matched the manifest hash."
            )
            verified.add_metric([], s.blobs_verified)
            yield verified
            failed = CounterMetricFamily(
                "ttfs_blobs_failed", "Blobs that failed verification twice and were given up."
            )
            failed.add_metric([], s.blobs_failed)
            yield failed
            yield GaugeMetricFamily(
                "ttfs_requests_in_flight", "Ranged reads in flight.", value=s.inflight_requests
            )
            queued = GaugeMetricFamily(
                "ttfs_queued_blocks", "Blocks waiting for a connection.", labels=["priority"]
            )
            for prio, n in s.queued.items():
                queued.add_metric([prio.lower()], n)
            yield queued
            latency = HistogramMetricFamily(
                "ttfs_demand_read_seconds",
                "Time a read waited for its bytes (a reader blocked on the mount; every "
                "demand read, local hits included).",
            )
            latency.add_metric([], s.demand_buckets, sum_value=s.demand_sum)
            yield latency

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    try:
        started: object = start_http_server(port, host, registry=registry)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics at {host}:{port}: {e.strerror or e}") from e
    # prometheus_client >= 0.20 returns (server, thread); older ones nothing to stop with.
    server = started[0] if isinstance(started, tuple) else started
    log.info("serving Prometheus metrics at http://%s:%d/metrics", host, port)
    return Exporter(server, f"{host}:{port}")


@contextlib.contextmanager
def exporting(
    address: str | None, snapshot: Callable[[], MetricsSnapshot], *, role: str
) -> Iterator[Exporter | None]:
    """:func:`start_exporter` for the block's duration when ``address`` is set (else nothing).

    Raises:
        ConfigError: see :func:`start_exporter`.
    """
    if address is None:
        yield None
        return
    from .. import __version__

    exporter = start_exporter(address, snapshot, role=role, version=__version__)
    try:
        yield exporter
    finally:
        exporter.close()
