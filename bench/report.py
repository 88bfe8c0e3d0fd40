"""Markdown tables of :mod:`bench.driver`'s samples: one eager table, one lazy table and one
resource table per profile, then the issue's targets with where ttfs stands (never asserted)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .nginx import LATENCY, RATE

if TYPE_CHECKING:
    from .driver import Sample, Setup

GB = 1e9
MiB = 1 << 20

LABELS = {
    "resolve": "ttfs resolve",
    "materialize": "ttfs mount + ttfs materialize",
    "snapshot": "huggingface_hub.snapshot_download (defaults: 8 workers)",
    "hf_transfer": "hf_transfer.download per file (100 x 10 MiB chunks)",
    "aria2c": "aria2c -x16 -s16 -k1M",
    "curl": "curl --parallel (1 connection per file)",
    "rclone": "rclone mount --vfs-cache-mode full, cat every file",
}


def ok(samples: Sequence[Sample]) -> list[Sample]:
    return [x for x in samples if not x.get("failed")]


def med(samples: Sequence[Sample], key: str) -> float | None:
    vals = [x[key] for x in ok(samples) if key in x]
    return statistics.median(vals) if vals else None


def spread(samples: Sequence[Sample], key: str = "wall") -> str:
    vals = [x[key] for x in ok(samples) if key in x]
    if not vals:
        return "failed" if samples else "-"
    text = f"{statistics.median(vals):.2f}"
    if len(vals) > 1:
        text += f" ({min(vals):.2f}-{max(vals):.2f})"
    fails = len(samples) - len(ok(samples))
    return text + (f", {fails} failed" if fails else "")


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def eager_table(s: Setup, res: dict[str, list[Sample]]) -> list[str]:
    total = s.total
    base = med(res.get("resolve", []), "wall")
    lines = [
        "| contender | wall s, median (min-max) | GB/s | time / ttfs resolve | CPU s per GB "
        "| peak RSS MiB | origin requests | origin bytes per byte | in flight: mean (peak) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for item, label in LABELS.items():
        if item not in res:
            continue
        xs = res[item]
        wall = med(xs, "wall")
        cpu, rss = med(xs, "cpu"), med(xs, "rss")
        req, nbytes = med(xs, "req"), med(xs, "bytes")
        inflight, peak = med(xs, "inflight"), med(xs, "peak")
        lines.append(
            f"| {label} | {spread(xs)} | {fmt(total / wall / GB if wall else None)} "
            f"| {fmt(wall / base if wall and base else None, '.2f', 'x')} "
            f"| {fmt(cpu / (total / GB) if cpu is not None else None)} "
            f"| {fmt(rss / MiB if rss else None, '.0f')} | {fmt(req, '.0f')} "
            f"| {fmt(nbytes / total if nbytes is not None else None, '.3f')} "
            f"| {fmt(inflight, '.1f')} ({fmt(peak, '.0f')}) |"
        )
    return lines


def lazy_table(s: Setup, res: dict[str, list[Sample]]) -> list[str]:
    lines = ["| figure | s, median (min-max) | detail (medians) |", "|---|---|---|"]

    def row(item: str, label: str, detail: str) -> None:
        if item in res:
            lines.append(f"| {label} | {spread(res[item])} | {detail} |")

    def mb(item: str) -> str:
        v = med(res.get(item, []), "fetched")
        return fmt(v / 1e6 if v is not None else None, ".0f", " MB fetched")

    shard, name = s.tensor
    for item, label in (
        ("tensor", "first tensor: start `ttfs mount` -> tensor read (prefetch on)"),
        ("tensor_noprefetch", "first tensor: start `ttfs mount --no-prefetch` -> tensor read"),
        ("tensor_rclone", "first tensor: start `rclone mount` -> tensor read"),
    ):
        xs = res.get(item, [])
        row(
            item,
            label,
            f"mount {fmt(med(xs, 'mount'))} s + tensor {fmt(med(xs, 'tensor'))} s; {mb(item)}",
        )
    xs = res.get("load_mount", [])
    rss = med(xs, "rss")
    row(
        "load_mount",
        "full safetensors load through a cold `ttfs mount`",
        f"mount {fmt(med(xs, 'mount'))} s + load {fmt(med(xs, 'load'))} s; "
        f"daemon peak RSS {fmt(rss / MiB if rss else None, '.0f')} MiB",
    )
    row("materialize", "`ttfs mount` + `ttfs materialize` (no load)", "from the eager table")
    xs = res.get("snapshot_load", [])
    row(
        "snapshot_load",
        "`snapshot_download`, then the same load",
        f"download {fmt(med(xs, 'download'))} s + load {fmt(med(xs, 'load'))} s "
        "(interpreter start included in the total)",
    )
    xs = res.get("warm_read", [])
    if xs:
        for key, label in (
            ("mount_read", "warm sequential read through the mount (blobs page-cache hot)"),
            ("direct_read", "sequential read of the cached blob files directly"),
            ("mount_read_cold", "read through the mount after drop_caches"),
            ("direct_read_cold", "read of the blob files after drop_caches"),
        ):
            t = med(xs, key)
            if t is not None:
                lines.append(f"| {label} | {spread(xs, key)} | {s.total / t / GB:.2f} GB/s |")
    lines.append("")
    lines.append(
        f"The tensor is `{name}` in `{shard}` (the middle tensor of the middle shard); every "
        "mount starts with an empty cache."
    )
    return lines


def resource_table(s: Setup, profile: str, res: dict[str, list[Sample]]) -> list[str]:
    total_gb = s.total / GB
    cols = [("resolve", "ttfs resolve (process)"), ("materialize", "ttfs mount daemon")]
    cols = [(k, v) for k, v in cols if ok(res.get(k, []))]
    if not cols:
        return []
    lines = ["| ttfs | " + " | ".join(v for _, v in cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def add(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    get = {k: res[k] for k, _ in cols}
    add("GB/s", [fmt(total_gb / w if (w := med(get[k], "wall")) else None) for k, _ in cols])
    add(
        "CPU s per GB",
        [fmt(c / total_gb if (c := med(get[k], "cpu")) is not None else None) for k, _ in cols],
    )
    add(
        "cores busy (CPU s / wall s)",
        [
            fmt(c / w if (c := med(get[k], "cpu")) and (w := med(get[k], "wall")) else None)
            for k, _ in cols
        ],
    )
    add(
        "peak RSS MiB",
        [fmt(r / MiB if (r := med(get[k], "rss")) else None, ".0f") for k, _ in cols],
    )
    add(
        "origin requests per GB",
        [fmt(r / total_gb if (r := med(get[k], "req")) else None, ".0f") for k, _ in cols],
    )
    add(
        "origin bytes per byte delivered",
        [fmt(b / s.total if (b := med(get[k], "bytes")) else None, ".4f") for k, _ in cols],
    )
    if profile.removeprefix("https-") == "cdn":
        add(
            f"origin capacity at --max-connections {s.args.connections} (x 25 MB/s)",
            [f"{s.args.connections * RATE / GB:.2f} GB/s" for _ in cols],
        )
        caps = []
        effs = []
        for k, _ in cols:
            inflight, w = med(get[k], "inflight"), med(get[k], "wall")
            if inflight and w:
                cap = inflight * RATE / GB
                caps.append(f"{inflight:.1f} -> {cap:.2f} GB/s")
                effs.append(f"{total_gb / w / cap:.0%}")
            else:
                caps.append("-")
                effs.append("-")
        add("mean requests in flight -> capacity they give", caps)
        add("throughput / that capacity", effs)
    return lines


def targets(s: Setup, results: dict[str, dict[str, list[Sample]]]) -> list[str]:
    lines = ["| target | where ttfs stands | |", "|---|---|---|"]

    def add(name: str, value: str, met: bool | None) -> None:
        mark = "n/a" if met is None else ("met" if met else "NOT met")
        lines.append(f"| {name} | {value} | {mark} |")

    for profile, res in results.items():
        mat = med(res.get("materialize", []), "wall")
        # Issue 9: resolve and mount + materialize at least as fast as the best peer downloader.
        peers = [t for p in ("aria2c", "hf_transfer") if (t := med(res.get(p, []), "wall"))]
        if peers:
            best = min(peers)
            for item, label in (("resolve", "ttfs resolve"), ("materialize", "mount+materialize")):
                ours = med(res.get(item, []), "wall")
                if ours:
                    add(
                        f"{profile}: {label} at least as fast as the best of aria2c / hf_transfer",
                        f"{ours:.2f} s vs {best:.2f} s",
                        ours <= best,
                    )
        if profile == "cdn" and mat:
            snap = med(res.get("snapshot", []), "wall")
            if snap:
                add(
                    "cdn: materialize >= 2x faster than snapshot_download",
                    f"{snap / mat:.2f}x",
                    snap / mat >= 2,
                )
            for peer in ("hf_transfer", "aria2c", "rclone"):
                t = med(res.get(peer, []), "wall")
                if t:
                    add(f"cdn: materialize faster than {peer}", f"{t / mat:.2f}x", t > mat)
            inflight = med(res.get("materialize", []), "inflight")
            if inflight:
                cap = inflight * RATE
                eff = s.total / mat / cap
                add(
                    "cdn: within 10% of the origin's capacity for the connections used",
                    f"{eff:.0%} of {inflight:.1f} in flight x 25 MB/s; "
                    f"{s.total / mat / GB:.2f} of {s.args.connections * RATE / GB:.2f} GB/s "
                    f"at {s.args.connections} connections",
                    eff >= 0.9,
                )
        if profile == "raw":
            ours = med(res.get("resolve", []), "wall")
            theirs = med(res.get("hf_transfer", []), "wall")
            if ours and theirs:
                add(
                    "raw: ttfs resolve >= 0.7x hf_transfer's throughput",
                    f"{theirs / ours:.2f}x",
                    theirs / ours >= 0.7,
                )
        t = med(res.get("tensor", []), "wall")
        if t is not None and profile == "cdn":
            add("cdn: first tensor from a cold mount <= 0.3 s", f"{t:.2f} s", t <= 0.3)
        load = med(res.get("load_mount", []), "wall")
        if load and mat:
            add(
                f"{profile}: cold full load through the mount <= 1.15x materialize",
                f"{load / mat:.2f}x",
                load / mat <= 1.15,
            )
        mr, dr = (
            med(res.get("warm_read", []), "mount_read"),
            med(res.get("warm_read", []), "direct_read"),
        )
        if mr and dr:
            add(
                f"{profile}: warm read through the mount >= 0.8x direct read of the blob",
                f"{dr / mr:.2f}x ({s.total / mr / GB:.2f} vs {s.total / dr / GB:.2f} GB/s)",
                dr / mr >= 0.8,
            )
    rss = [
        x["rss"]
        for res in results.values()
        for item in ("materialize", "load_mount", "warm_read")
        for x in ok(res.get(item, []))
        if "rss" in x
    ]
    if rss:
        peak = max(rss)
        add("daemon RSS <= 300 MiB", f"{peak / MiB:.0f} MiB (largest seen)", peak <= 300 * MiB)
    return lines


def render(
    s: Setup,
    results: dict[str, dict[str, list[Sample]]],
    *,
    info: list[tuple[str, str]],
    started: str,
    elapsed: float,
) -> str:
    n_tensors = s.n_tensors
    out = [f"# ttfs benchmarks, {started}", ""]
    out += ["| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info]
    shards = len(s.shards)
    done = max((len(v) for res in results.values() for v in res.values()), default=0)
    runs = f"{done} run(s)" + (f" of {s.args.runs} planned" if done < s.args.runs else "")
    out += [
        "",
        f"Model: {s.total / MiB:.0f} MiB in {len(s.files)} files ({shards} safetensors shards"
        f"{f', {n_tensors} tensors' if n_tensors else ''}). {runs} of every item, "
        "interleaved; medians with min-max. Every item starts cold (outputs and caches deleted, "
        "dirty pages synced). Origin: nginx on 127.0.0.1 behind a fake Hugging Face hub "
        f"(metadata, 302 to nginx). cdn = {RATE / 1e6:.0f} MB/s per connection + "
        f"{LATENCY * 1000:.0f} ms per request; raw = no limits; https-* = the same over TLS. "
        f"ttfs --max-connections "
        f"{s.args.connections}. Whole run: {elapsed / 60:.1f} min.",
        "",
    ]
    for profile, res in results.items():
        base = profile.removeprefix("https-")
        title = (
            f"{profile}: {RATE / 1e6:.0f} MB/s per connection, +{LATENCY * 1000:.0f} ms per request"
            if base == "cdn"
            else f"{profile}: no limits"
        )
        if base != profile:
            title += " (HTTPS: TLS on loopback, a CA made for the run)"
        out += [f"## {title}", "", "### Eager download", ""]
        out += eager_table(s, res)
        lazy = lazy_table(s, res)
        if len(lazy) > 4:
            out += ["", "### Lazy figures", "", *lazy]
        rt = resource_table(s, profile, res)
        if rt:
            out += ["", "### ttfs resources", "", *rt]
        out.append("")
    out += ["## Targets (reported, not asserted)", "", *targets(s, results), ""]
    if s.args.drop_caches:
        out.append(
            "The page cache was dropped (globally) only in the warm-read item, before its "
            "'after drop_caches' rows; the served files were read back into it afterwards."
        )
    if s.notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in s.notes]
    return "\n".join(out) + "\n"
