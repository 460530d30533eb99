"""Measuring: one case's bytes checked and its metrics timed for every tool, and the boot step; every
repetition on a fresh mount, the archive read just before (docs/benchmarks.md, "How it is measured").
"""

import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

from kit.qemu import boot, kvm_usable
from kit.sample import make_archive, write_sparse_boot_image

from .data import Dataset, Sizes, build
from .harness import (
    CHUNK,
    PssSampler,
    Served,
    TimedOut,
    ToolFailed,
    read_some,
    run_timed,
    serve_fuse,
    timed_read,
    watchdog,
)
from .results import BOOT_MOUNT, BOOT_RAW, METRICS, CaseInfo, Results
from .tools import Tarfuse, Tool

BOOT = "boot"  # not a data case: QEMU boots the sample image (kit.sample), from the raw file and a mount
# fio's random reads: (readers, placement); placement None is unpinned, else (server CPU, fio CPU)
RANDOM = {"rand1": (1, None), "rand1-same": (1, (0, 0)), "rand1-apart": (1, (0, 1)), "rand4": (4, None)}
PINNED = tuple(m for m, (_, placement) in RANDOM.items() if placement is not None)
BOOT_MESSAGE = "tarfuse bench: booted"
BOOT_IMAGE_SIZE = 24 << 20  # as the tests' sample image
_SHORT_READ = " (read returned 0 bytes: end of file inside the image)"


class Options(NamedTuple):
    sizes: Sizes
    reps: int
    fio_runtime: float
    cap: float
    scratch: Path


def _status(exc: ToolFailed) -> str:
    return str(exc) if isinstance(exc, TimedOut) else f"failed: {exc}"


def run_case(case: str, tools: list[Tool], options: Options, results: Results) -> None:
    """Build the data, check every tool's bytes, then measure: one repetition of all tools at a time."""
    directory = options.scratch / case
    directory.mkdir()
    print(f"\n== {case}: building the data", flush=True)
    began = time.monotonic()
    dataset = build(case, directory, options.sizes)
    size = f"{dataset.archive.stat().st_size / (1 << 20):,.0f} MiB"
    print(f"   {dataset.title} ({size} archive, {time.monotonic() - began:.1f} s)", flush=True)
    extents = len(dataset.model.extents)
    results.cases.append(CaseInfo(case, dataset.title, dataset.members, extents, dataset.metrics))
    metrics = ("ready", *dataset.metrics)
    try:
        taking_part = [t for t in tools if any(t.measures(case, m) for m in (*metrics, "rss"))]
        usable = [tool for tool in taking_part if _admit(tool, dataset, options, results)]
        rss_metric = "seq" if "seq" in metrics else "ready"  # the peak PSS: during the full read
        for metric in (m for m in PINNED if m in metrics and len(os.sched_getaffinity(0)) < 2):
            for tool in usable:
                results.stop(case, metric, tool.name, "n/a: one CPU: no placement to choose")
        for metric in metrics:
            for rep in range(options.reps):
                shown = []
                for tool in usable:
                    if results.outcome(case, metric, tool.name).status or not tool.measures(case, metric):
                        continue
                    warm(dataset.archive)
                    record_rss = metric == rss_metric and tool.measures(case, "rss")
                    shown.append(_measure_once(metric, tool, dataset, options, results, record_rss))
                if shown:
                    print(f"   {metric} {rep + 1}/{options.reps}: {', '.join(shown)}", flush=True)
    finally:
        _detach_loops(dataset.archive)
        shutil.rmtree(directory, ignore_errors=True)
    print(f"   ({case} took {time.monotonic() - began:.0f} s)", flush=True)


def _admit(tool: Tool, dataset: Dataset, options: Options, results: Results) -> bool:
    """Whether the tool takes part in this case: installed, supported, and serving the right bytes."""
    status = tool.problem
    if status is None and (reason := tool.unsupported(dataset)) is not None:
        status = f"n/a: {reason}"
    if status is None:
        warm(dataset.archive)
        try:
            status, how = verify(tool, dataset, options)
        except ToolFailed as exc:
            status, how = _status(exc), ""
        if status is None:
            results.verified[(dataset.name, tool.name)] = how
        print(f"   {tool.name}: {status or 'bytes ok (' + how + ')'}", flush=True)
    if status is not None:
        metrics = tuple(m for m in ("ready", *dataset.metrics, "rss") if tool.measures(dataset.name, m))
        results.exclude(dataset.name, metrics, tool.name, status)
    return status is None


def _measure_once(
    metric: str, tool: Tool, dataset: Dataset, options: Options, results: Results, record_rss: bool
) -> str:
    """One repetition of one metric for one tool, on a fresh mount; returns what to print."""
    case = dataset.name
    try:
        with tool.serve(dataset, options.scratch, options.cap) as served:
            sampler = PssSampler(served)
            try:
                with sampler if record_rss else nullcontext():
                    value = _run_metric(metric, served, dataset, options)
            finally:  # also after a timed-out read: the peak so far is still a peak
                if record_rss and sampler.peak is not None and not served.aborted.is_set():
                    results.add(case, "rss", tool.name, sampler.peak / (1 << 20))
        if value is None:
            results.stop(case, metric, tool.name, "n/a: sparse member (no single byte range)")
            return f"{tool.name} n/a"
        results.add(case, metric, tool.name, value)
        return f"{tool.name} {METRICS[metric].format(value)}"
    except ToolFailed as exc:
        results.stop(case, metric, tool.name, _status(exc))
        return f"{tool.name} {_status(exc)}"


def _run_metric(metric: str, served: Served, dataset: Dataset, options: Options) -> float | None:
    if metric == "ready":
        return served.ready_s
    if metric == "seq":
        return dataset.size / timed_read(served, dataset.size, options.cap) / 1e9
    if metric == "qemu":
        return None if served.qemu_source is None else run_qemu_convert(served, options)
    if served.fio_target is None:
        return None
    readers, placement = RANDOM[metric]
    if placement is not None:
        served.pin(placement[0])  # every thread of every process of the server; no-op for the limits
    return run_fio(served, readers, options, None if placement is None else placement[1])


def run_boot(tools: list[Tool], options: Options, results: Results) -> None:
    """Boot the sample image in QEMU (KVM) from the raw file and through a fresh tarfuse mount, in turns."""
    print(f"\n== {BOOT}: QEMU boots the sample image to its serial line", flush=True)
    tarfuse = next((t for t in tools if isinstance(t, Tarfuse) and t.name == "tarfuse"), None)
    if (reason := _boot_unavailable(tarfuse)) is not None or tarfuse is None:
        results.boot_status = reason
        print(f"   skipped: {reason}", flush=True)
        return
    directory = options.scratch / BOOT
    directory.mkdir()
    image = directory / "disk.raw"
    write_sparse_boot_image(str(image), BOOT_IMAGE_SIZE, BOOT_MESSAGE + "\r\n")
    archive = make_archive("oldgnu", image, directory / "boot.tar")
    mountpoint = Path(os.path.realpath(directory)) / "mnt"
    command = [*tarfuse.command(), "-f", "-o", "member=disk.raw", str(archive), str(mountpoint)]
    for rep in range(options.reps):
        shown = []
        for name in (BOOT_RAW, BOOT_MOUNT):
            try:
                if name == BOOT_RAW:
                    seconds = boot_once(image, options.cap)
                else:
                    with serve_fuse(command, mountpoint, mountpoint / image.name, options.cap):
                        seconds = boot_once(mountpoint / image.name, options.cap)
                results.boot.setdefault(name, []).append(seconds)
                shown.append(f"{name} {METRICS['ready'].format(seconds)}")
            except ToolFailed as exc:
                results.boot_status = f"{name}: {_status(exc)}"
                shown.append(f"{name} {_status(exc)}")
        print(f"   boot {rep + 1}/{options.reps}: {', '.join(shown)}", flush=True)


def _boot_unavailable(tarfuse: Tool | None) -> str | None:
    if not kvm_usable():
        return "no usable /dev/kvm (QEMU without KVM would time the emulator, not the disk)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if tarfuse is None or tarfuse.problem:
        return "tarfuse is not among the tools run" if tarfuse is None else tarfuse.problem
    return None


def boot_once(image: Path, cap: float) -> float:
    """Start QEMU on `image`; return the seconds until the boot sector's line is on its serial port."""
    booted = boot(image, BOOT_MESSAGE, cap)
    if booted.seconds is not None:
        return float(booted.seconds)
    if booted.exit_status is None:
        raise TimedOut(cap)
    raise ToolFailed(f"qemu-system-x86_64 exited with {booted.exit_status} before the serial line")


def sample_ranges(dataset: Dataset) -> list[tuple[int, int]]:
    """Ranges to compare first: both ends, edges of some extents, and random places, odd sizes included."""
    size, rng = dataset.size, random.Random(5)
    ranges = [(0, min(size, 65536)), (max(0, size - 65536), min(size, 65536)), (max(0, size - 100), 200)]
    extents = dataset.model.extents
    for extent in (extents[i] for i in sorted({rng.randrange(len(extents)) for _ in range(8)})):
        ranges += [(max(0, extent.offset - 300), 600), (max(0, extent.offset + extent.length - 300), 600)]
    for _ in range(48):
        n = rng.randrange(1, 256 * 1024)
        ranges.append((rng.randrange(max(1, size - n)), n))
    return ranges


def verify(tool: Tool, dataset: Dataset, options: Options) -> tuple[str | None, str]:
    """Compare what `tool` serves with the model; return (None, how) or ("WRONG ...", "")."""
    model = dataset.model
    with tool.serve(dataset, options.scratch, options.cap) as served:
        if served.size != model.size:
            return f"WRONG SIZE: {served.size:,} bytes served, the image has {model.size:,}", ""
        ranges = sample_ranges(dataset)
        with watchdog(served, options.cap):
            for offset, size in ranges:
                expected, got = model.read(offset, size), _read_exact(served, offset, size, options.cap)
                if got != expected:
                    pairs = enumerate(zip(got, expected, strict=False))
                    at = offset + next((i for i, (a, b) in pairs if a != b), min(len(got), len(expected)))
                    short = _SHORT_READ if len(got) < len(expected) else ""
                    return f"WRONG BYTES at image offset {at:,}{short}", ""
        digest = hashlib.sha256()
        try:
            timed_read(served, model.size, options.cap, digest.update)
        except TimedOut as exc:
            return None, f"{len(ranges)} sampled ranges; the full read {exc}"
        if digest.hexdigest() != model.sha256:
            return "WRONG BYTES: the sha256 of the full read differs (the sampled ranges matched)", ""
    return None, "sampled ranges and the sha256 of a full read"


def _read_exact(served: Served, offset: int, size: int, cap: float) -> bytes:
    buffer, done = memoryview(bytearray(size)), 0
    while done < size and (n := read_some(served, buffer[done:], offset + done, cap)) > 0:
        done += n
    return bytes(buffer[:done])


def warm(path: Path) -> None:
    """Read the archive, so the page cache holds it ("tar warm")."""
    buffer = memoryview(bytearray(CHUNK * 4))
    with open(path, "rb", buffering=0) as archive:
        while archive.readinto(buffer):
            pass


def run_fio(served: Served, readers: int, options: Options, cpu: int | None = None) -> float:
    """Random 4 KiB reads for a fixed time, fio pinned on `cpu` if given; return reads/s over all readers."""
    assert served.fio_target is not None
    pinned = [] if cpu is None else ["taskset", "-c", str(cpu)]
    command = [
        *pinned, "fio", "--name=rand", "--rw=randread", "--bs=4k", "--ioengine=psync", f"--numjobs={readers}",
        "--group_reporting", "--time_based", f"--runtime={round(options.fio_runtime * 1000)}ms",
        "--randrepeat=1", "--norandommap", "--invalidate=0", "--readonly", "--output-format=json",
        *served.fio_target,
    ]  # fmt: skip
    _, output = run_timed(command, options.fio_runtime + options.cap, served)
    job = json.loads(output[output.index("{") :])["jobs"][0]
    if job.get("error"):
        raise ToolFailed(f"fio: error {job['error']}")
    return float(job["read"]["iops"])


def run_qemu_convert(served: Served, options: Options) -> float:
    """Convert the image to a raw file; return the seconds it took. The file is deleted."""
    assert served.qemu_source is not None
    target = options.scratch / "converted.raw"
    source_format = [] if served.qemu_source.startswith("json:") else ["-f", "raw"]
    try:
        command = ["qemu-img", "convert", *source_format, "-O", "raw", served.qemu_source, str(target)]
        return run_timed(command, options.cap, served)[0]
    finally:
        target.unlink(missing_ok=True)


def _detach_loops(archive: Path) -> None:
    """Detach loop devices still backed by the archive (after a crash in the middle of a loop step)."""
    listing = subprocess.run(["losetup", "-j", str(archive)], capture_output=True, text=True, check=False)
    for line in listing.stdout.splitlines():
        subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)
