"""Run many fuzz cases in worker processes, and turn whatever goes wrong in them into findings.

Workers are forked from a fork server (a fresh interpreter with tarfuse imported, as the daemon is, not a
copy of whatever process runs the fuzzer); each runs batches of case numbers under RLIMIT_AS, publishes the
case it is on and its deadline in shared memory, and sends results back. A case past its deadline is a
hang: the parent sends SIGABRT and faulthandler prints where the worker was. A worker that dies is a crash.
A case after which the worker's peak RSS is over the memory ceiling (256 MiB for any archive, at
any point of a mount's life) is a finding too, and the worker makes way for a fresh one. Either way the
batch goes on in a new worker, and the finding names the case, which engine.Corpus can make again.
"""

import contextlib
import dataclasses
import faulthandler
import math
import multiprocessing
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

from kit.fuzz.engine import (
    DIFFERS,
    INSPECT,
    NOT_EXTRACTED,
    Check,
    Corpus,
    check_archive,
    compare_with_gnu_tar,
    quiet_logs,
)

MIB = 1 << 20
INSPECT_KEPT = 10  # differential disagreements of each kind saved for a person to look at
# What the fork server imports once for every worker: what the daemon imports, the decompressors, and
# what unpickling a worker's arguments imports (hypothesis: fuzz.seeds imports sparsegen, which imports it).
# pytest too when it runs the fuzzer: a check function of a test module imports it.
_PRELOAD = ["tarfuse.cli", "tarfuse.sources.index", "rapidgzip", "xz", "pyzstd", "hypothesis"]


@dataclass(frozen=True, slots=True)
class Config:
    seed: int = 0
    cases: int = 1_000_000
    start: int = 0  # first case number
    jobs: int = 2
    compare_every: int = 200  # every Nth case is also extracted with GNU tar; 0: never
    time_limit: float = 10.0  # seconds a case may take (six times that with a GNU tar comparison)
    # RLIMIT_AS of each worker, in bytes: the stop for runaway allocations, above the address space that
    # libraries reserve and never touch. rapidgzip maps 256 MiB at a time (three such mappings after .tar.gz
    # reads): the workers peak at 1.35 GiB of address space (VmPeak) with 75 MiB resident, and under 1 GiB
    # rapidgzip dies of SIGSEGV. What is really used is held to rss_ceiling.
    memory_limit: int = 2 << 30
    rss_ceiling: int = 256 * MIB  # peak RSS a worker may reach: more after a case is a finding
    batch: int = 100  # cases handed to a worker at a time
    # Cases a worker runs before it makes way for a fresh one, as persistent-mode fuzzers restart theirs:
    # a daemon opens one archive, but a worker opens a different one every case, and its heap fragments
    # slowly over hundreds of thousands of them. Each case is still measured against rss_ceiling.
    cases_per_worker: int = 20_000


@dataclass(frozen=True, slots=True)
class Finding:
    case: int
    seed: str
    kind: str  # the exception's class, "hang", "crash (...)", "memory-ceiling", "differs", "not-extracted"
    detail: str
    steps: tuple[str, ...] = ()

    def headline(self) -> str:
        return f"case {self.case}: {self.kind} on {self.seed} after {' + '.join(self.steps) or '?'}"


@dataclass
class Memory:
    """The workers' memory, in bytes: the most any had at its start, and the highest peaks any reached."""

    baseline: int = 0  # resident when the worker started, before its first case
    peak: int = 0  # peak RSS (VmHWM, ru_maxrss) after a case
    peak_case: int = -1  # the case after which the worker reached `peak`
    address_space: int = 0  # peak virtual size (VmPeak), what RLIMIT_AS limits

    def merge(self, other: "Memory") -> None:
        self.baseline = max(self.baseline, other.baseline)
        self.address_space = max(self.address_space, other.address_space)
        if other.peak > self.peak:
            self.peak, self.peak_case = other.peak, other.peak_case


@dataclass
class Summary:
    cases: int = 0
    interrupted: bool = False
    outcomes: Counter[str] = field(default_factory=Counter)  # "served" or the refusing error class
    compared: Counter[str] = field(default_factory=Counter)  # differential categories
    findings: list[Finding] = field(default_factory=list)
    inspect: list[Finding] = field(default_factory=list)  # differential disagreements, not findings
    memory: Memory = field(default_factory=Memory)

    def merge(self, other: "Summary") -> None:
        self.cases += other.cases
        self.outcomes.update(other.outcomes)
        self.compared.update(other.compared)
        self.findings += other.findings
        for item in other.inspect:
            self.keep(item)
        self.memory.merge(other.memory)

    def keep(self, item: Finding) -> None:
        """Keep a differential disagreement, unless INSPECT_KEPT of its kind are kept already."""
        if sum(kept.kind == item.kind for kept in self.inspect) < INSPECT_KEPT:
            self.inspect.append(item)


def run_case(corpus: Corpus, config: Config, number: int, check: Check, work: Path, summary: Summary) -> None:
    """Make case `number`, check it (and compare it with GNU tar if it is its turn), record the result."""
    summary.cases += 1
    try:
        case = corpus.case(config.seed, number)
    except Exception as exc:  # a bug in the fuzzer itself: as loud as one in tarfuse
        summary.findings.append(
            Finding(number, "?", "fuzzer error", "".join(traceback.format_exception(exc)))
        )
        return
    rng = random.Random(number)
    try:
        summary.outcomes[check(case, rng)] += 1
    except Exception as exc:  # everything but an ArchiveError is what we are looking for
        summary.outcomes["finding"] += 1
        detail = "".join(traceback.format_exception(exc))
        summary.findings.append(Finding(number, case.seed, type(exc).__name__, detail, case.steps))
        return
    if config.compare_every and number % config.compare_every == 0:
        try:
            category, detail = compare_with_gnu_tar(case, work, rng)
        except Exception as exc:  # tarfuse's or the comparison's own: a finding either way
            detail = "".join(traceback.format_exception(exc))
            kind = f"{type(exc).__name__} comparing"
            summary.findings.append(Finding(number, case.seed, kind, detail, case.steps))
            return
        summary.compared[category] += 1
        if category in (DIFFERS, NOT_EXTRACTED):
            summary.findings.append(Finding(number, case.seed, category, detail, case.steps))
        elif category in INSPECT:
            summary.keep(Finding(number, case.seed, category, detail, case.steps))


Slot = MutableSequence[float]  # a shared RawArray: [case number, deadline], for the parent's watchdog


def _worker_main(
    conn: Connection, corpus: Corpus, config: Config, check: Check, slot: Slot, work: Path
) -> None:
    """Run the batches the parent sends; publish (case, deadline) in `slot` for the parent's watchdog.

    Results go back as (summary, next case number) at the end of a batch, and at once after a finding,
    so that a later case that kills the worker cannot take it along. After a case that took the peak
    RSS over the ceiling, or after config.cases_per_worker cases, the worker sends its results and ends:
    the batch goes on in a fresh one.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    resource.setrlimit(resource.RLIMIT_AS, (config.memory_limit, config.memory_limit))
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # spills of compressed cases, not in ~/.cache
    quiet_logs()
    meter = _MemoryMeter()
    with (work / "traceback").open("w") as log:
        faulthandler.enable(file=log, all_threads=True)  # SIGABRT from the watchdog: print the stack
        os.dup2(log.fileno(), 2)  # and what libraries print before they abort (rapidgzip: corrupt streams)
        run = 0
        while (task := conn.recv()) is not None:
            summary = Summary()
            for number in range(*task):
                run += 1
                slot[1] = math.inf
                slot[0] = number
                comparing = bool(config.compare_every) and number % config.compare_every == 0
                slot[1] = time.monotonic() + config.time_limit * (6 if comparing else 1)
                run_case(corpus, config, number, check, work, summary)
                over = meter.after_case(number, config.rss_ceiling, summary, corpus, config.seed)
                leaving = over or run >= config.cases_per_worker
                if leaving or (summary.findings and number + 1 < task[1]):
                    summary.memory = meter.figures()
                    conn.send((summary, number + 1))
                    summary = Summary()
                if leaving:
                    return
            slot[1] = math.inf
            summary.memory = meter.figures()
            conn.send((summary, task[1]))


class _MemoryMeter:
    """This process's peak RSS after every case, against the ceiling; its start and peaks, for the report."""

    def __init__(self) -> None:
        self.memory = Memory(baseline=_peak_rss())
        self.memory.peak = self.memory.baseline

    def after_case(self, number: int, ceiling: int, summary: Summary, corpus: Corpus, seed: int) -> bool:
        """Record the peak after case `number`; if it is over `ceiling`, add a finding and return True."""
        peak = _peak_rss()  # getrusage: one system call, cheap enough for every case
        if peak <= self.memory.peak:
            return False
        before, self.memory.peak, self.memory.peak_case = self.memory.peak, peak, number
        if peak <= ceiling:
            return False
        try:
            case = corpus.case(seed, number)
            name, steps = case.seed, case.steps
        except Exception:  # a fuzzer error: run_case reported it
            name, steps = "?", ()
        detail = (
            f"peak RSS {peak / MIB:.0f} MiB after this case, over the {ceiling / MIB:.0f} MiB ceiling "
            f"(before it: {before / MIB:.0f} MiB; the worker started at {self.memory.baseline / MIB:.0f} "
            f"MiB, now {_status('VmRSS') / MIB:.0f} MiB resident)"
        )
        summary.findings.append(Finding(number, name, "memory-ceiling", detail, steps))
        return True

    def figures(self) -> Memory:
        self.memory.address_space = max(self.memory.address_space, _status("VmPeak"))
        return dataclasses.replace(self.memory)


def _peak_rss() -> int:
    """This process's peak resident set (its threads' too), in bytes: what the ceiling is about."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB


def _status(key: str) -> int:
    """A "kB" line of /proc/self/status, in bytes (0 if it is not there)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    return 0


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    slot: Slot
    work: Path
    task: tuple[int, int] | None = None
    reported: int = 0  # the first case of the task whose result has not come back yet
    aborted_at: float | None = None  # when the watchdog sent SIGABRT


Progress = Callable[[Summary, float], None]


class _Pool:
    """Worker processes fed batches of case numbers; a dead or stuck worker becomes a finding."""

    def __init__(self, corpus: Corpus, config: Config, check: Check, work: Path) -> None:
        self.corpus, self.config, self.check, self.work = corpus, config, check, work
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(_PRELOAD + (["pytest"] if "pytest" in sys.modules else []))
        end = config.start + config.cases
        self.tasks = deque((s, min(s + config.batch, end)) for s in range(config.start, end, config.batch))
        self.summary = Summary()
        self.workers: list[_Worker] = []
        self._spawned = 0

    def spawn(self) -> None:
        parent, child = self.context.Pipe()
        slot = self.context.RawArray("d", [-1.0, math.inf])
        self._spawned += 1
        work = self.work / f"worker-{self._spawned}"
        work.mkdir()
        args = (child, self.corpus, self.config, self.check, slot, work)
        process = self.context.Process(target=_worker_main, args=args, daemon=True)
        process.start()
        child.close()
        worker = _Worker(process, parent, slot, work)
        self.workers.append(worker)
        self.feed(worker)

    def feed(self, worker: _Worker) -> None:
        worker.task = self.tasks.popleft() if self.tasks else None
        worker.reported = worker.task[0] if worker.task else 0
        worker.slot[0] = -1.0  # until the worker starts the batch's first case
        with contextlib.suppress(OSError):
            worker.conn.send(worker.task)

    def step(self, timeout: float) -> None:
        """Wait up to `timeout` for batches to finish or workers to die, and act on it."""
        self.watchdog()
        by_handle: dict[object, _Worker] = {}
        for worker in self.workers:
            by_handle[worker.conn] = by_handle[worker.process.sentinel] = worker
        for handle in wait(list(by_handle), timeout):
            worker = by_handle[handle]
            if worker in self.workers and not (handle is worker.conn and self._receive(worker)):
                self.retire(worker)

    def _receive(self, worker: _Worker) -> bool:
        """Take results; after a whole batch, hand out the next. False if the worker is gone or done."""
        try:
            summary, worker.reported = worker.conn.recv()
        except (EOFError, OSError):
            return False
        self.summary.merge(summary)
        if worker.task is not None and worker.reported < worker.task[1]:
            return True  # a finding, sent early: the batch goes on
        self.feed(worker)
        return worker.task is not None

    def watchdog(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.aborted_at is None and now > worker.slot[1]:
                worker.aborted_at = now
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGABRT)  # type: ignore[arg-type]
            elif worker.aborted_at is not None and now > worker.aborted_at + 10:
                worker.process.kill()

    def retire(self, worker: _Worker) -> None:
        """Reap a worker that finished, made way or died (a finding); the rest of its batch goes on."""
        worker.process.join(5 if worker.task is None else None)
        self.workers.remove(worker)
        with contextlib.suppress(EOFError, OSError):  # results it sent before it ended
            while worker.conn.poll():
                summary, worker.reported = worker.conn.recv()
                self.summary.merge(summary)
        worker.conn.close()
        if worker.task is not None and worker.process.exitcode != 0:
            self._record_death(worker)
        elif worker.task is not None and worker.reported < worker.task[1]:  # it made way: go on
            self.tasks.appendleft((worker.reported, worker.task[1]))
        if self.tasks and len(self.workers) < self.config.jobs:
            self.spawn()

    def _record_death(self, worker: _Worker) -> None:
        assert worker.task is not None
        start, stop = worker.task
        number = int(worker.slot[0])
        if not start <= number < stop:  # died before its first case
            number = start
        code = worker.process.exitcode
        kind = "hang" if worker.aborted_at is not None else f"crash (exit status {code})"
        log = worker.work / "traceback"
        detail = log.read_text(errors="replace")[-6000:] if log.exists() else ""
        try:
            case = self.corpus.case(self.config.seed, number)
            seed, steps = case.seed, case.steps
        except Exception:  # the worker died making the case: the same error, reported
            seed, steps = "?", ("the fuzzer failed to make this case",)
        self.summary.cases += 1
        self.summary.outcomes["finding"] += 1
        self.summary.findings.append(Finding(number, seed, kind, detail, steps))
        if number + 1 < stop:
            self.tasks.appendleft((number + 1, stop))
        if worker.reported < number:  # cases run but not reported: run again (they found nothing)
            self.tasks.appendleft((worker.reported, number))

    def stop(self) -> None:
        for worker in self.workers:
            worker.process.kill()
            worker.process.join()


def run(
    corpus: Corpus,
    config: Config,
    check: Check = check_archive,
    progress: Progress | None = None,
    interval: float = 10.0,
) -> Summary:
    """Run cases config.start .. config.start + config.cases in config.jobs worker processes."""
    started = last = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tarfuse-fuzz-") as tmp:
        pool = _Pool(corpus, config, check, Path(tmp))
        try:
            for _ in range(min(config.jobs, len(pool.tasks))):
                pool.spawn()
            while pool.workers:
                pool.step(0.25)
                if progress is not None and time.monotonic() - last >= interval:
                    last = time.monotonic()
                    progress(pool.summary, last - started)
        except KeyboardInterrupt:
            pool.summary.interrupted = True
        finally:
            pool.stop()
    return pool.summary


def save_finding(corpus: Corpus, config: Config, finding: Finding, directory: Path) -> Path:
    """Write the finding's archive and a note (how to make it again, what happened) under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{finding.kind.split(' ')[0]}-seed{config.seed}-case{finding.case}"
    path = directory / f"{stem}.txt"  # the note, and the archive if it can be made
    try:
        case = corpus.case(config.seed, finding.case)
        path = directory / f"{stem}{case.suffix}"
        path.write_bytes(case.archive())
    except Exception:  # a fuzzer error: the note says what it was
        path = directory / f"{stem}.txt"
    note = [
        finding.headline(),
        f"replay: scripts/fuzz.py --seed {config.seed} --replay {finding.case}",
        "",
        finding.detail,
    ]
    (directory / f"{stem}.txt").write_text("\n".join(note))
    return path
