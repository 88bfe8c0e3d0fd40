"""Settings: one frozen value built at the edge (CLI or compat API), never at import time.

``Settings.from_env(env, **overrides)`` is the only place that reads ``TTFS_*`` and the
``TRUSS_TRANSFER_*`` tuning variables; every core class receives a ``Settings`` (or a narrower
piece of it). The mapping of the truss-transfer variables onto the block scheduler is written in
:meth:`Settings.from_env` and in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .units import GiB, MiB, parse_size

log = logging.getLogger(__name__)

TRUTHY = frozenset({"1", "true", "yes", "y"})


def truthy(value: str | None, default: bool = False) -> bool:
    """truss-transfer boolean parsing: ``1/true/yes/y`` (any case) are true, others false."""
    if value is None:
        return default
    return value.strip().lower() in TRUTHY


OFF = frozenset({"0", "false", "no", "n", "off"})


def switched_off(value: str | None) -> bool:
    """For ttfs's own on-by-default switches (``TTFS_SPLICE``, ``TTFS_SHARED_TRUST``): only
    ``0/false/no/n/off`` (any case) turn them off; unset, empty or anything else leaves them on."""
    return value is not None and value.strip().lower() in OFF


SharedTrust = Literal["replicas", "store", "off"]
HotStart = Literal["copy", "symlink"]


def shared_trust(value: str | None) -> SharedTrust:
    """``TTFS_SHARED_TRUST``: ``store`` (any case) trusts only this block store's own records,
    an off word (:func:`switched_off`) none; unset or anything else, any replica's."""
    if switched_off(value):
        return "off"
    if value is not None and value.strip().lower() == "store":
        return "store"
    return "replicas"


def shared_hotstart(value: str | None) -> HotStart:
    """``TTFS_SHARED_HOTSTART``: ``copy`` (unset or empty) or ``symlink`` (``link``), any case.

    Raises:
        ConfigError: any other value (one line naming the variable).
    """
    word = (value or "").strip().lower()
    if word in ("", "copy"):
        return "copy"
    if word in ("symlink", "link"):
        return "symlink"
    raise ConfigError(f"TTFS_SHARED_HOTSTART must be copy or symlink, got {value!r}")


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """``/var/cache/ttfs`` for root, else ``$XDG_CACHE_HOME/ttfs`` (``~/.cache/ttfs``)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/cache/ttfs")
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ttfs"


def default_workers() -> int:
    """Worker processes by default: one per core this process may run on, at most 16.

    One Python process moves at most ~0.4 GB/s whatever its connection count (docs/performance.md);
    separate processes scale with the cores. More workers than cores only add context switches.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Retries of one range: jittered exponential backoff bounded by attempts *and* time.

    8 attempts with base 0.25 s doubling to 8 s spans ~30 s of origin trouble: long enough for a
    CDN node or a load balancer to recover, short enough that a FUSE read fails with EIO while a
    human is still watching.
    """

    attempts: int = 8
    base_delay: float = 0.25
    max_delay: float = 8.0
    deadline: float = 120.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    cache_dir: Path
    # True when the user named the cache (``--cache-dir`` / ``TTFS_CACHE_DIR``). A resolve
    # without one keeps its block store on the destination's filesystem (resolve.store_plan).
    cache_dir_given: bool = False
    cache_max_bytes: int | None = None
    # Presence/checksum granularity and the unit of a demand fetch. 2 MiB: a demand miss on a
    # 25 MB/s CDN stream costs ~80 ms + latency, and 140 GB of blocks is a 70k-entry bitmap.
    block_size: int = 2 * MiB
    # Largest contiguous range one background request covers (design: <= 16 MiB so a demand
    # miss waits at most one unit behind background work).
    background_unit: int = 16 * MiB
    # Total ranged GETs in flight (~1 per 85 MB/s of target bandwidth; 32 = ~2.7 GB/s).
    max_connections: int = 32
    # Connections only DEMAND reads may use (gcsfuse/blobfuse2 reserve ~10%).
    demand_reserved: int = 4
    # Most background ranges in flight for one blob
    # (TRUSS_TRANSFER_RANGE_DOWNLOAD_WORKERS_PER_FILE).
    per_blob_connections: int = 32
    # False = one sequential stream per file (TRUSS_TRANSFER_USE_RANGE_DOWNLOAD=false).
    use_range: bool = True
    # Worker processes that move range bodies (ttfs.transfer); 0 = in process (httpx on trio).
    workers: int = field(default_factory=default_workers)
    # Workers splice plain-HTTP bodies socket -> pipe -> file (TTFS_SPLICE=0: through a buffer).
    splice: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout: float = 10.0
    # A range that delivers no byte for this long is abandoned and re-issued.
    stall_timeout: float = 20.0
    # Seconds between batched fdatasync + index writes of the block store.
    flush_interval: float = 0.5
    verify: bool = True
    hf_endpoint: str | None = None
    # The one proxy ranged GETs go through (TTFS_PROXY); HTTP(S)_PROXY are ignored for them
    # (providers._stream.data_proxy says why).
    proxy: str | None = field(default=None, repr=False)  # may carry user:password
    # The b10fs shared cache tier (docs/b10fs.md); None = off.
    shared_cache: SharedCacheConfig | None = None
    # HOST:PORT of the opt-in Prometheus endpoint (--metrics, TTFS_METRICS); None = off.
    metrics: str | None = None
    # Seconds a process that needs the cache directory to itself (a mount, or a resolve whose
    # owner cannot serve it) waits for the current owner before failing (ttfs.owner).
    owner_wait: float = 30.0
    secrets_env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from environment variables, then apply non-None ``overrides``.

        truss-transfer variables are mapped onto the scheduler (see docs/configuration.md):
        ``TRUSS_TRANSFER_RANGE_DOWNLOAD_WORKERS`` caps ``max_connections``,
        ``..._PER_FILE`` caps ``per_blob_connections``, ``..._USE_RANGE_DOWNLOAD`` switches
        ``use_range``; ``TRUSS_TRANSFER_NUM_WORKERS`` (files at once) has no equivalent because
        ttfs schedules blocks, not files, and is accepted but only validated.

        Raises:
            ConfigError: a variable or override has an invalid value.
        """
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        values["cache_dir"] = (
            Path(env["TTFS_CACHE_DIR"]) if env.get("TTFS_CACHE_DIR") else (default_cache_dir(env))
        )
        values["cache_dir_given"] = bool(env.get("TTFS_CACHE_DIR")) or (
            overrides.get("cache_dir") is not None
        )
        if env.get("TTFS_CACHE_MAX_BYTES"):
            values["cache_max_bytes"] = _size(env, "TTFS_CACHE_MAX_BYTES")
        if env.get("TTFS_BLOCK_SIZE"):
            values["block_size"] = _size(env, "TTFS_BLOCK_SIZE")
        conns = _int(env, "TTFS_MAX_CONNECTIONS")
        upstream_conns = _int(env, "TRUSS_TRANSFER_RANGE_DOWNLOAD_WORKERS")
        if conns is not None:
            values["max_connections"] = conns
        elif upstream_conns is not None:
            # Upstream's 192 assumes Rust threads; beyond ~64 Python gains nothing (measured
            # in docs/configuration.md), so the upstream value caps rather than sets.
            values["max_connections"] = min(upstream_conns, 64)
        per_file = _int(env, "TRUSS_TRANSFER_RANGE_DOWNLOAD_WORKERS_PER_FILE")
        if per_file is not None:
            values["per_blob_connections"] = per_file
        if env.get("TRUSS_TRANSFER_USE_RANGE_DOWNLOAD") is not None:
            values["use_range"] = truthy(env["TRUSS_TRANSFER_USE_RANGE_DOWNLOAD"], True)
        workers = _int(env, "TRUSS_TRANSFER_NUM_WORKERS")
        if workers is not None and workers <= 0:
            raise ConfigError("TRUSS_TRANSFER_NUM_WORKERS must be >= 1")
        if env.get("TTFS_WORKERS", "").strip():
            raw = env["TTFS_WORKERS"]
            try:
                values["workers"] = int(raw)
            except ValueError as e:
                raise ConfigError(f"TTFS_WORKERS={raw!r} is not an integer") from e
        values["splice"] = not switched_off(env.get("TTFS_SPLICE"))
        if env.get("TTFS_STALL_TIMEOUT"):
            values["stall_timeout"] = _float(env, "TTFS_STALL_TIMEOUT")
        if env.get("TTFS_RETRY_ATTEMPTS"):
            values["retry"] = RetryPolicy(attempts=int(_float(env, "TTFS_RETRY_ATTEMPTS")))
        if env.get("TTFS_FLUSH_INTERVAL"):
            values["flush_interval"] = _float(env, "TTFS_FLUSH_INTERVAL")
        if env.get("TTFS_OWNER_WAIT"):
            values["owner_wait"] = _float(env, "TTFS_OWNER_WAIT")
        if env.get("TTFS_VERIFY") is not None:
            values["verify"] = truthy(env["TTFS_VERIFY"], True)
        values["hf_endpoint"] = env.get("HF_ENDPOINT") or None
        values["metrics"] = env.get("TTFS_METRICS") or None
        if env.get("TTFS_PROXY"):
            proxy = env["TTFS_PROXY"].strip()
            if "://" not in proxy:
                raise ConfigError("TTFS_PROXY must be a URL like http://host:port")
            values["proxy"] = proxy
        # b10fs: BASETEN_FS_ENABLED + USE_BASETEN_FS_TRUSS_TRANSFER, or --shared-cache DIR.
        values["shared_cache"] = SharedCacheConfig.from_env(
            env, overrides.pop("shared_cache_dir", None)
        )
        values["secrets_env"] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            settings = cls(**values)
        except TypeError as e:
            raise ConfigError(str(e)) from e
        settings.check()
        return settings

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.check()
        return new

    def check(self) -> None:
        """Raise ConfigError for values that would deadlock or make no sense."""
        if self.block_size < 64 * 1024 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block size must be a power of two >= 64 KiB, got {self.block_size}")
        if self.background_unit < self.block_size:
            raise ConfigError("background unit must be at least one block")
        if self.max_connections < 1:
            raise ConfigError("max connections must be >= 1")
        if not 0 <= self.demand_reserved < self.max_connections:
            # Keep at least one background slot, else prefetch could never run.
            object.__setattr__(self, "demand_reserved", max(0, self.max_connections - 1))
        if not 0 <= self.workers <= 256:
            raise ConfigError(f"workers must be between 0 and 256, got {self.workers}")
        if self.per_blob_connections < 1:
            raise ConfigError("per-file connections must be >= 1")
        if self.stall_timeout <= 0:
            raise ConfigError("stall timeout must be > 0")
        if self.metrics is not None:
            from .telemetry.metrics import parse_address

            parse_address(self.metrics)
        if not self.owner_wait >= 0:
            raise ConfigError("TTFS_OWNER_WAIT must be >= 0")


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not an integer") from e
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    return value


def _float(env: Mapping[str, str], name: str) -> float:
    raw = env[name]
    try:
        return float(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not a number") from e


def _size(env: Mapping[str, str], name: str) -> int:
    try:
        return parse_size(env[name])
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from e


# -- the b10fs shared cache (docs/b10fs.md); ttfs.blocks.shared does the storage half --------
# Upstream constants (spec §7.1): the cache dir, 96 h cleanup, 100 GiB headroom, 128 MiB probe.
DEFAULT_DIR = Path("/cache/org/artifacts/truss_transfer_managed_v1")
CLEANUP_HOURS = 96.0
MIN_FREE_GB = 100.0
BENCHMARK_BYTES = 128 * MiB
PUBLISH_TIMEOUT = 900.0
SPEED_CPU_THRESHOLD = 16
LOCK_STALE_SECS = 60.0


def _number(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not a number") from e
    if not value >= 0:  # also NaN
        raise ConfigError(f"{name} must be >= 0, got {raw!r}")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class SharedCacheConfig:
    """Where the shared cache is and the rules it follows (built from the environment).

    ``enabled_by`` says how it was switched on: ``"b10fs"`` (``BASETEN_FS_ENABLED`` and
    ``USE_BASETEN_FS_TRUSS_TRANSFER``) or ``"option"`` (``--shared-cache`` /
    ``TTFS_SHARED_CACHE``). The rules are the same either way.
    """

    directory: Path
    enabled_by: str = "option"
    cleanup_hours: float = CLEANUP_HOURS
    max_stale_bytes: int | None = None
    min_free_bytes: int = int(MIN_FREE_GB * GiB)
    # Read threshold in MiB/s; None draws one per process, as upstream (see desired_speed).
    speed_mbps: float | None = None
    benchmark_bytes: int = BENCHMARK_BYTES
    lock_stale_secs: float = LOCK_STALE_SECS
    poll_secs: float = 0.5
    publish_timeout: float = PUBLISH_TIMEOUT
    # Which records stand in for the hash of a hot start (docs/b10fs.md, "The trust rule"):
    # "replicas" (TTFS_SHARED_TRUST unset or on): a record any replica wrote beside the entry,
    # or this block store's own; "store": only this block store's own; "off": none, every hot
    # start hashes.
    trust: SharedTrust = "replicas"
    # How a resolve answers a hit (docs/b10fs.md, "Hot start"): "copy" (the default) makes a
    # plain local file; "symlink" links the output to the entry, as upstream, once it is trusted
    # or hashed (TTFS_SHARED_HOTSTART=symlink).
    hotstart: HotStart = "copy"

    @property
    def lock_refresh_secs(self) -> float:
        """How often a holder touches its locks: several times per stale timeout."""
        return max(0.1, min(5.0, self.lock_stale_secs / 4))

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], directory: Path | str | None = None
    ) -> SharedCacheConfig | None:
        """The shared-cache settings, or None when the tier is off.

        On when ``directory`` (``--shared-cache``) or ``TTFS_SHARED_CACHE`` names a directory,
        or when both ``BASETEN_FS_ENABLED`` and ``USE_BASETEN_FS_TRUSS_TRANSFER`` are truthy
        (then at ``TRUSS_TRANSFER_CACHE_DIR``, default :data:`DEFAULT_DIR`).

        Raises:
            ConfigError: a numeric variable is not a number (upstream silently uses the default).
        """
        chosen = directory if directory is not None else (env.get("TTFS_SHARED_CACHE") or None)
        if chosen is not None:
            where, by = Path(chosen), "option"
        elif truthy(env.get("BASETEN_FS_ENABLED")) and truthy(
            env.get("USE_BASETEN_FS_TRUSS_TRANSFER")
        ):
            where, by = Path(env.get("TRUSS_TRANSFER_CACHE_DIR") or DEFAULT_DIR), "b10fs"
        else:
            return None
        hours = _number(env, "TRUSS_TRANSFER_B10FS_CLEANUP_HOURS", CLEANUP_HOURS)
        stale_gb = _number(env, "TRUSS_TRANSFER_B10FS_MAX_STALE_CACHE_SIZE_GB", None)
        free_gb = _number(env, "TRUSS_TRANSFER_B10FS_MIN_REQUIRED_AVAILABLE_SPACE_GB", MIN_FREE_GB)
        speed = _number(env, "TRUSS_TRANSFER_B10FS_DOWNLOAD_SPEED_MBPS", None)
        lock_secs = _number(env, "TTFS_SHARED_LOCK_STALE_SECS", LOCK_STALE_SECS)
        assert hours is not None and free_gb is not None and lock_secs is not None
        if lock_secs <= 0:
            raise ConfigError("TTFS_SHARED_LOCK_STALE_SECS must be > 0")
        return cls(
            directory=where,
            enabled_by=by,
            cleanup_hours=hours,
            max_stale_bytes=None if stale_gb is None else int(stale_gb * GiB),
            min_free_bytes=int(free_gb * GiB),
            speed_mbps=speed,
            lock_stale_secs=lock_secs,
            trust=shared_trust(env.get("TTFS_SHARED_TRUST")),
            hotstart=shared_hotstart(env.get("TTFS_SHARED_HOTSTART")),
        )
