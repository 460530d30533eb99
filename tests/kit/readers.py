"""Readers that keep an image busy: random reads, each checked against the bytes the image must have.

One tally (`Tally`) and one read loop for every concurrent reader of the tests and scripts/stress.py:
- `read_job` reads a file (a mounted image, a loop device over it) as a `Job` says, until it is told to
  stop, its deadline passes or (unless `keep_going`) a read fails; `Readers` runs jobs in threads of
  this process and in processes of their own, and collects their tallies;
- `read_at_random` reads through a `read(offset, size)` callable in this process (a source, no mount),
  and `in_threads` runs several of those at once.

Run as a script, a reader process: `python readers.py JOB_JSON` prints its tally as JSON on stdout.
"""

import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

READ_SIZES = (512, 4096, 65_536, 300_000, 1 << 20)
MIN_LOG_SIZE, MAX_LOG_SIZE = 9, 22  # log2 of the sizes of a `log_sizes` job: 512 B to 4 MiB
REOPEN_PAUSE = 0.01  # seconds between a close and the next open, with `reopen`
RETRY_PAUSE = 0.1  # seconds before a `keep_going` reader opens again after a failed open
NOTES = 5  # failures said in full per tally; the rest are counted


@dataclass
class Tally:
    """What readers saw. `wrong` must stay 0; `errors` holds the errno names of failed opens and reads.

    A short read returns fewer bytes than the image has there, but the right ones.
    """

    reads: int = 0
    bytes: int = 0
    opens: int = 0
    short: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the first few wrong or failed reads, said in full

    def check(self, got: bytes, expected: bytes, what: str) -> None:
        """Count one read that returned `got` where the image has `expected`."""
        self.reads += 1
        self.bytes += len(got)
        if got != expected[: len(got)]:
            self.wrong += 1
            self._note(f"{what}: {len(got)} bytes, not the image's")
        elif len(got) < len(expected):
            self.short += 1

    def fail(self, exc: OSError, what: str) -> None:
        """Count one open, read or close that failed with `exc`."""
        self.errors.append(errno.errorcode.get(exc.errno or 0, str(exc)))
        self._note(f"{what}: {exc}")

    def add(self, other: "Tally") -> None:
        self.reads += other.reads
        self.bytes += other.bytes
        self.opens += other.opens
        self.short += other.short
        self.wrong += other.wrong
        self.errors += other.errors
        self.notes += other.notes[: max(0, NOTES - len(self.notes))]

    def _note(self, message: str) -> None:
        if len(self.notes) < NOTES:
            self.notes.append(message)


def total(tallies: list[Tally]) -> Tally:
    """The sum of `tallies`."""
    summed = Tally()
    for tally in tallies:
        summed.add(tally)
    return summed


@dataclass(frozen=True)
class Job:
    """What one reader reads, against what, until when. Sent to reader processes as JSON."""

    path: str  # the file read: a served image, or a loop device over one
    oracle: str  # a file holding the bytes `path` must have
    seed: int
    stop_file: str = ""  # stop once this file exists...
    deadline: float = 0.0  # ...or once time.time() passes this (0: no deadline)
    ready: str = ""  # created after the first read, so that the caller knows the reader is in flight
    edges: tuple[int, ...] = ()  # data/hole edges of the image: half the reads cross one
    log_sizes: bool = False  # sizes log-uniform from 512 B to 4 MiB, instead of one of READ_SIZES
    reopen: bool = False  # every read its own open and close, then a pause: moments with the file closed
    churn: bool = False  # now and then drop the file's cached pages, or close it and open it again
    keep_going: bool = False  # after a failed open or read, open again and go on (else: stop there)

    def stopped(self) -> bool:
        if self.deadline and time.time() >= self.deadline:
            return True
        return bool(self.stop_file) and os.path.exists(self.stop_file)


def _pick(rng: random.Random, job: Job, image_size: int) -> tuple[int, int]:
    """The offset and size of the next read."""
    size = int(2 ** rng.uniform(MIN_LOG_SIZE, MAX_LOG_SIZE)) if job.log_sizes else rng.choice(READ_SIZES)
    if job.edges and rng.random() < 0.5:  # across a data/hole edge
        return max(0, min(image_size - 1, rng.choice(job.edges) - rng.randrange(size))), size
    return rng.randrange(image_size), size


def _after_read(rng: random.Random, job: Job, fd: int, tally: Tally) -> int:
    """Close the file after a read (`reopen`), or now and then drop its pages or close it (`churn`);
    return the descriptor still open, or -1."""
    if job.reopen:
        _close(fd, tally, job.path)
        time.sleep(REOPEN_PAUSE)
        return -1
    if job.churn:
        draw = rng.random()
        if draw < 0.05:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        elif draw < 0.10:
            return _close(fd, tally, job.path)
    return fd


def read_job(job: Job, stop: Callable[[], bool] | None = None) -> Tally:
    """Read random ranges of `job.path` until `stop()` (by default the job's stop file or deadline), each
    checked against the oracle file; stop at the first failed open or read unless `job.keep_going`."""
    stop = stop or job.stopped
    rng, tally, fd = random.Random(job.seed), Tally(), -1
    oracle = os.open(job.oracle, os.O_RDONLY)
    image_size = os.fstat(oracle).st_size
    try:
        while not stop():
            if fd < 0:
                try:
                    fd = os.open(job.path, os.O_RDONLY)
                except OSError as exc:
                    tally.fail(exc, f"open of {job.path}")
                    if not job.keep_going:
                        break
                    time.sleep(RETRY_PAUSE)
                    continue
                tally.opens += 1
            offset, size = _pick(rng, job, image_size)
            try:
                got = os.pread(fd, size, offset)
            except OSError as exc:
                tally.fail(exc, f"pread({size}, {offset}) of {job.path}")
                if not job.keep_going:
                    break
                fd = _close(fd, tally, job.path)
                continue
            tally.check(got, os.pread(oracle, size, offset), f"pread({size}, {offset}) of {job.path}")
            if tally.reads == 1 and job.ready:
                open(job.ready, "x").close()
            fd = _after_read(rng, job, fd, tally)
    finally:
        os.close(oracle)
        if fd >= 0:
            _close(fd, tally, job.path)
    return tally


def _close(fd: int, tally: Tally, path: str) -> int:
    """Close `fd`; return -1, the descriptor of no file."""
    try:
        os.close(fd)
    except OSError as exc:  # closing after the daemon is gone may fail; the tally says so
        tally.fail(exc, f"close of {path}")
    return -1


class Readers:
    """Reader threads and processes, started together, joined together."""

    def __init__(self) -> None:
        self._threads: list[tuple[threading.Thread, list[Tally]]] = []
        self._processes: list[subprocess.Popen[str]] = []

    def start_thread(self, job: Job, stop: Callable[[], bool] | None = None) -> None:
        """Run `read_job(job, stop)` in a thread of this process (a daemon thread: if one hangs in the
        kernel, this process can still exit)."""
        result: list[Tally] = []
        thread = threading.Thread(target=lambda: result.append(read_job(job, stop)), daemon=True)
        thread.start()
        self._threads.append((thread, result))

    def start_process(self, job: Job) -> None:
        """Run `job` in a process of its own; it stops at its stop file or deadline."""
        command = [sys.executable, __file__, json.dumps(asdict(job))]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._processes.append(process)

    def thread_alive(self, number: int) -> bool:
        """Whether the reader thread started `number`th is still reading."""
        return self._threads[number][0].is_alive()

    def join(self, timeout: float) -> tuple[list[Tally], list[str]]:
        """Wait up to `timeout` seconds for each reader; return the tallies of those that ended, and what
        went wrong with the others (a thread or process that hangs, a process that failed)."""
        tallies, lost = [], []
        for number, (thread, result) in enumerate(self._threads):
            thread.join(timeout)
            if thread.is_alive():
                lost.append(f"reader thread {number} hangs")
            tallies += result
        for number, process in enumerate(self._processes):
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                lost.append(f"reader process {number} hangs")
                continue
            if process.returncode != 0:
                lost.append(f"reader process {number} exited with {process.returncode}: {err.strip()}")
                continue
            tallies.append(Tally(**json.loads(out)))
        return tallies, lost

    def kill(self) -> None:
        """Kill the reader processes still running (threads end with this process)."""
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


def read_at_random(
    read: Callable[[int, int], bytes], oracle: bytes, seed: int, reads: int, max_size: int
) -> Tally:
    """Make `reads` random reads of 1 to `max_size` - 1 bytes through `read(offset, size)`, in this thread,
    each checked against `oracle`, the bytes that `read` must return."""
    rng, tally = random.Random(seed), Tally()
    for _ in range(reads):
        offset, size = rng.randrange(len(oracle)), rng.randrange(1, max_size)
        tally.check(read(offset, size), oracle[offset : offset + size], f"{size} at {offset}")
    return tally


def in_threads(count: int, work: Callable[[int], Tally]) -> Tally:
    """Run `work(0)` to `work(count - 1)` in `count` threads at once; return the sum of their tallies."""
    results: list[Tally] = []
    threads = [threading.Thread(target=lambda n=n: results.append(work(n))) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == count, "a reader thread failed"
    return total(results)


if __name__ == "__main__":
    print(json.dumps(asdict(read_job(Job(**json.loads(sys.argv[1]))))))
