"""The opt-in Prometheus endpoint (``--metrics HOST:PORT`` / ``TTFS_METRICS``).

Scraped over real HTTP from a real mount daemon and a real ``ttfs resolve``, against the
counting origin injecting 503s, and parsed with prometheus_client's own parser; the counters
must move the way the origin's own counters say they should.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo.origin import Faults, Origin
from tests.mount_helpers import mounted, require_fuse, run_py, ttfs, wait_for, write_manifest
from tests.origin_helpers import REPO_ROOT, cli_env, write_random_files
from ttfs.errors import ConfigError
from ttfs.fuse.kernel import is_mounted
from ttfs.telemetry.metrics import LatencyHistogram, parse_address

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_parse_address_and_histogram() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address(":9464") == ("0.0.0.0", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    for bad in ("", "host", "host:0", "host:70000", "host:x"):
        with pytest.raises(ConfigError):
            parse_address(bad)
    h = LatencyHistogram((0.1, 1.0))
    for s in (0.05, 0.1, 0.5, 3.0):
        h.observe(s)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and abs(h.total - 3.65) < 1e-9


def test_bad_metrics_address_and_busy_port_are_one_line_errors(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "cache")
    manifest = tmp_path / "m.json"
    pointer = {
        "resolution": {
            "resolution_type": "http",
            "url": "http://127.0.0.1:9/x.bin",  # never asked: the endpoint fails first
            "expiration_timestamp": 4044816725,
        },
        "uid": "x",
        "file_name": "x.bin",
        "hashtype": "sha256",
        "hash": "0" * 64,
        "size": 1,
    }
    manifest.write_text(json.dumps({"pointers": [pointer]}))
    done = ttfs("resolve", "--metrics", "nope", str(manifest), str(tmp_path / "out"), env=env)
    assert done.returncode == 2 and "not HOST:PORT" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = ttfs(
            "resolve", "--metrics", f"127.0.0.1:{port}", str(manifest), str(tmp_path / "o"), env=env
        )
    assert done.returncode != 0 and "cannot serve metrics" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_mount_path_does_not_import_prometheus_client() -> None:
    run_py(
        "import sys, ttfs.cli, ttfs.fuse.serve, ttfs.resolve, ttfs.fetch\n"
        "assert 'prometheus_client' not in sys.modules, 'imported at start-up'\n"
    )


@pytest.mark.fuse
def test_mount_metrics_move_with_reads_retries_and_verification(tmp_path: Path) -> None:
    require_fuse()
    src = tmp_path / "src"
    files = write_random_files(src, {"a.bin": 6 * MiB, "b/c.bin": 3 * MiB, "d.json": 100})
    port = free_port()
    # Every third data request fails with 503 (seeded): retries and errors{kind="http_503"}.
    with Origin(src, faults=Faults(error_rate=0.34, seed=3)) as origin:
        manifest = tmp_path / "m.json"
        write_manifest(origin, src, manifest)
        mnt, cache = tmp_path / "mnt", tmp_path / "cache"
        mnt.mkdir()
        with socket.socket() as busy:  # a port in use: one line from the daemon, no mount
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = f"127.0.0.1:{busy.getsockname()[1]}"
            done = ttfs(
                "mount", "--cache-dir", str(cache), "--metrics", taken, str(manifest), str(mnt)
            )
        assert done.returncode != 0 and "cannot serve metrics" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and not is_mounted(mnt)
        args = ("--no-prefetch", "--metrics", f"127.0.0.1:{port}")
        with mounted(manifest, mnt, cache, *args):
            before = scrape(port)
            assert value(before, "ttfs_info", role="mount", version="0.1.0") == 1
            assert value(before, "ttfs_bytes_total", source="origin") == 0
            assert value(before, "ttfs_demand_read_seconds_count") == 0
            run_py("import sys; open(sys.argv[1], 'rb').read()", str(mnt / "a.bin"))
            after = scrape(port)
            fetched = value(after, "ttfs_bytes_total", source="origin")
            assert fetched == origin.stats.bytes_sent == 6 * MiB
            assert value(after, "ttfs_requests_total", source="origin") >= 3
            assert value(after, "ttfs_demand_read_seconds_count") > 0
            assert value(after, "ttfs_demand_read_seconds_bucket", le="+Inf") == value(
                after, "ttfs_demand_read_seconds_count"
            )
            assert value(after, "ttfs_demand_read_seconds_sum") > 0
            assert ttfs("materialize", str(mnt)).returncode == 0
            done = scrape(port)
            assert value(done, "ttfs_blobs_verified_total") == 3
            assert value(done, "ttfs_blobs_failed_total") == 0
            assert value(done, "ttfs_bytes_total", source="origin") == 9 * MiB + 100
            retries = value(done, "ttfs_retries_total")
            assert retries >= 1
            assert value(done, "ttfs_errors_total", kind="http_503") == retries
            assert value(done, "ttfs_requests_in_flight") == 0
        # A remount finds every byte local: counted as source="local", nothing from origin.
        origin.faults = Faults()
        with mounted(manifest, mnt, cache, *args):
            wait_for(
                lambda: value(scrape(port), "ttfs_bytes_total", source="local") == 9 * MiB + 100,
                timeout=30,
                what="the local bytes to be counted",
            )
            assert value(scrape(port), "ttfs_bytes_total", source="origin") == 0
    assert files  # the source files exist for the whole test


def test_resolve_metrics_are_scraped_while_it_runs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = write_random_files(src, {"w1.bin": 8 * MiB, "w2.bin": 8 * MiB})
    port = free_port()
    # 8 MB/s per response: the resolve lasts a few seconds, long enough to scrape.
    with Origin(src, rate_limit=8e6) as origin:
        manifest = tmp_path / "m.json"
        write_manifest(origin, src, manifest)
        env = cli_env(tmp_path / "cache", TTFS_METRICS=f"127.0.0.1:{port}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ttfs", "resolve", str(manifest), str(tmp_path / "out")],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            seen: list[float] = []
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    m = scrape(port)
                except OSError:
                    time.sleep(0.05)  # not listening yet
                    continue
                assert value(m, "ttfs_info", role="resolve", version="0.1.0") == 1
                seen.append(value(m, "ttfs_bytes_total", source="origin"))
                time.sleep(0.2)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, err
    assert len(seen) >= 2, "scraped fewer than twice while resolving"
    assert seen == sorted(seen), "a counter went down"
    assert 0 < seen[-1] <= 16 * MiB and seen[-1] > seen[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(files)
    # The endpoint goes away with the process.
    with pytest.raises(OSError):
        scrape(port)
