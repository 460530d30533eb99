"""The patched pyfuse3 (scripts/pyfuse3/direct-read.patch, built by `make dev`): a READ of a registered file
handle is answered in C from a descriptor and a map of extents, with the bytes the Python handler would have
given; what it cannot answer (an error, a short read, too many pieces) goes to the Python handler as before,
and so does everything once the handle is unregistered or the table cleared (from a SIGIO handler, as
tarfuse does when its lease on the archive breaks). A signal's handler runs before a READ is answered in C.

This file is also the file system under test: `python test_pyfuse3_direct.py MOUNTPOINT DATA LOOP REGISTER
FORM` serves disk.raw, SIZE bytes whose data extents are EXTENTS, stored one after another in DATA from
DATA_START on (with a gap before EXTENTS[GAP_BEFORE], as members of an archive may be), until it is
unmounted. LOOP is how it waits for requests: pyfuse3's own trio loop (`trio`), tarfuse's direct wait
(`direct`), the blocking read of tarfuse's workers, in one process (`shared`), or two forked workers
(`workers`). REGISTER is what disk.raw is registered with at open: `data` (DATA's descriptor), `none`,
`badfd` (a descriptor that is not open), or another path (a short copy of DATA, or DATA on storage with bad
sectors), with its map given as FORM: `packed` (one array of 64-bit integers, as tarfuse gives it) or
`tuples`. Its Python handler always reads DATA. Beside disk.raw, reading `status` gives the counts (JSON),
reading `unregister` or `register` does that first, reading `malformed` first tries to register maps that
must be refused. SIGIO clears the table.
"""

import contextlib
import errno
import functools
import json
import mmap
import os
import random
import signal
import stat
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from kit.mounts import Mount, daemon_mount, is_mounted
from kit.storage import faulty_storage

from tarfuse.serve import eventloop, workers

NAME = b"disk.raw"
CONTROLS = (b"status", b"unregister", b"register", b"malformed")
FILE_INODE = pyfuse3.ROOT_INODE + 1
FILE_HANDLE = 7  # not the inode: the table is keyed by the handle open returned
CONTROL_HANDLE = 100  # + the index in CONTROLS
MiB = 1 << 20
SIZE = 3 * MiB + 123_457
STRIPES = 1_500_000  # 100 extents of 100 bytes, 100 apart: a read there is made of many pieces
# (offset, length) in disk.raw: not block-aligned, two that touch, one longer than a request, a read
# past the last is cut at SIZE; the file starts with a hole.
EXTENTS = (
    (1_000, 3_000),
    (8_192, 4_096),
    (12_288, 100),
    (20_000, MiB + 5),
    *((STRIPES + 200 * k, 100) for k in range(100)),
    (2 * MiB + 7, 300_000),
    (SIZE - 5_000, 5_000),
)
DATA_START = 512  # as a tar header before a member's data
GAP_BEFORE = 3  # 777 bytes of noise before this extent's data in DATA: a read across takes two preadv calls
BAD_FD = 2**31 - 1  # never open (above any RLIMIT_NOFILE)
MAX_PIECES = 64  # direct_read.c's DIRECT_READ_MAX_PIECES

HAS_DIRECT_READ = hasattr(pyfuse3, "direct_read_register")

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(
        not HAS_DIRECT_READ, reason="this pyfuse3 has no direct reads: `make dev` builds the patched one"
    ),
]


@functools.cache
def layout() -> tuple[tuple[int, int, int], ...]:
    """EXTENTS with where DATA holds each: (offset, length, data offset)."""
    placed, at = [], DATA_START
    for index, (offset, length) in enumerate(EXTENTS):
        at += 777 if index == GAP_BEFORE else 0
        placed.append((offset, length, at))
        at += length
    return tuple(placed)


def packed(extents: Iterable[tuple[int, int, int]]) -> "array[int]":
    """A map as one buffer of packed 64-bit integers, the form tarfuse registers."""
    return array("q", [number for extent in extents for number in extent])


def malformed() -> list["array[int]"]:
    """Packed maps of disk.raw that registering must refuse whole: each is right but for its end."""
    last_offset, last_length, last_at = layout()[-1]
    return [
        packed(layout())[:-1],  # not whole triples
        packed([*layout(), (last_offset + 10, 1, last_at)]),  # overlapping the extent before
        packed([*layout()[:-1], (last_offset, last_length + 1, last_at)]),  # past the size
    ]


@functools.cache
def data_bytes() -> bytes:
    """DATA: noise, so that a byte read from the wrong place shows."""
    end = layout()[-1][2] + layout()[-1][1]
    return random.Random(1).randbytes(end + 512)


@functools.cache
def image() -> bytes:
    """disk.raw as a reader must see it."""
    data, out = data_bytes(), bytearray(SIZE)
    for offset, length, at in layout():
        out[offset : offset + length] = data[at : at + length]
    return bytes(out)


class DirectFs(pyfuse3.Operations):
    """disk.raw, registered for direct reads at open with `register_fd` (None: not registered), read by
    Python from `data_fd`; and the control files."""

    def __init__(self, data_fd: int, register_fd: int | None, form: str) -> None:
        super().__init__()
        self.data_fd = data_fd
        self.register_fd = register_fd
        self.form = form
        self.python_reads = 0
        self.refused = 0  # maps that registering refused (`malformed`)
        self.init_done = False
        self.waits = 0  # with tarfuse's wait: how often pyfuse3 waited for a request
        self.most_between_waits = 0  # and the most requests answered in C from one wait to the next
        self._answered_at_wait = 0

    def init(self) -> None:
        self.init_done = True

    def register(self) -> None:
        if self.register_fd is not None:
            extents = packed(layout()) if self.form == "packed" else layout()
            pyfuse3.direct_read_register(FILE_HANDLE, self.register_fd, SIZE, extents)

    def register_malformed(self) -> None:
        for extents in malformed():
            try:
                pyfuse3.direct_read_register(FILE_HANDLE, self.data_fd, SIZE, extents)
            except ValueError:
                self.refused += 1

    def before_wait(self) -> None:
        answered = pyfuse3.direct_read_counts()[0]
        self.waits += 1
        self.most_between_waits = max(self.most_between_waits, answered - self._answered_at_wait)
        self._answered_at_wait = answered

    def status(self) -> dict[str, int]:
        answered, passed = pyfuse3.direct_read_counts()
        return {
            "answered": answered,
            "passed": passed,
            "python": self.python_reads,
            "waits": self.waits,
            "most_between_waits": self.most_between_waits,
            "refused": self.refused,
            "pid": os.getpid(),
        }

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o555
        elif inode == FILE_INODE:
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_size = SIZE
        elif FILE_INODE < inode <= FILE_INODE + len(CONTROLS):
            entry.st_mode = stat.S_IFREG | 0o444
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry.st_ino = inode
        entry.st_nlink = 1
        return entry

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == NAME:
            return await self.getattr(FILE_INODE)
        if parent_inode == pyfuse3.ROOT_INODE and name in CONTROLS:
            return await self.getattr(FILE_INODE + 1 + CONTROLS.index(name))
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == FILE_INODE:
            self.register()
            # direct_io: reads at and past the end come here too (the kernel stops at the size otherwise)
            return pyfuse3.FileInfo(fh=FILE_HANDLE, direct_io=True)
        if FILE_INODE < inode <= FILE_INODE + len(CONTROLS):
            # direct_io: every read comes here, whatever its size (a control file has none)
            return pyfuse3.FileInfo(fh=CONTROL_HANDLE + inode - FILE_INODE - 1, direct_io=True)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh == FILE_HANDLE:
            self.python_reads += 1
            return read_image(self.data_fd, off, size)
        control = CONTROLS[fh - CONTROL_HANDLE]
        if off > 0:
            return b""
        if control == b"unregister":
            pyfuse3.direct_read_unregister(FILE_HANDLE)
        elif control == b"register":
            self.register()
        elif control == b"malformed":
            self.register_malformed()
        return json.dumps(self.status()).encode()

    async def release(self, fh: int) -> None:
        pass


def read_image(data_fd: int, off: int, size: int) -> bytes:
    """Bytes [off, off + size) of disk.raw, read from DATA as the map says (the Python handler)."""
    end = min(off + size, SIZE)
    out = bytearray(max(end - off, 0))
    for offset, length, at in layout():
        start, stop = max(offset, off), min(offset + length, end)
        if start < stop:
            piece = os.pread(data_fd, stop - start, at + start - offset)
            if len(piece) != stop - start:
                raise pyfuse3.FUSEError(errno.EIO)
            out[start - off : stop - off] = piece
    return bytes(out)


def serve(mountpoint: str, data: str, loop: str, register: str, form: str) -> None:
    data_fd = os.open(data, os.O_RDONLY)
    named = {"data": data_fd, "none": None, "badfd": BAD_FD}
    fs = DirectFs(data_fd, named[register] if register in named else os.open(register, os.O_RDONLY), form)

    def clear_on_sigio(signum: int, frame: object) -> None:
        pyfuse3.direct_read_clear()
        print("SIGIO: cleared", flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    async def main_restarting_reads() -> None:
        # A blocking read of the FUSE device that a signal does not end (SA_RESTART): the handler can only
        # run when pyfuse3 runs it, which it must do before it answers a request in C. (Set once trio
        # runs: trio.run sets the SIGINT handler again, and with it SA_RESTART off.)
        signal.siginterrupt(signal.SIGIO, False)
        signal.siginterrupt(signal.SIGINT, False)
        await pyfuse3.main(1, 1)

    signal.signal(signal.SIGIO, clear_on_sigio)
    pyfuse3.init(fs, mountpoint, {"fsname=pyfuse3-direct-test", "ro"})
    try:
        if loop == "workers":
            serve_with_workers(fs)
        elif loop == "trio":
            trio.run(pyfuse3.main)
        else:  # one task, as tarfuse runs these waits
            eventloop.install(fs.before_wait, direct=True, shared=loop == "shared")
            if loop == "shared":
                signal.signal(signal.SIGINT, interrupt)
                trio.run(main_restarting_reads)
            else:
                trio.run(pyfuse3.main, 1, 1)
    finally:
        print("main counts:", json.dumps(fs.status()), flush=True)
        pyfuse3.close()


def serve_with_workers(fs: DirectFs) -> None:
    """As tarfuse does with -o workers=2: answer the INIT, fork two workers that read the device in turn."""
    eventloop.install(lambda: None, direct=False, until=lambda: fs.init_done)
    trio.run(pyfuse3.main)
    fs.register()  # the children inherit this entry, and clear it

    def worker(number: int) -> int:
        stopping = workers.stop_flag((signal.SIGTERM,))
        pyfuse3.direct_read_clear()
        fs.register()
        eventloop.install(lambda: None, direct=True, until=stopping, shared=True)
        try:
            trio.run(pyfuse3.main, 1, 1)
        finally:  # one write: the workers share the log
            os.write(sys.stdout.fileno(), f"worker {number} counts: {json.dumps(fs.status())}\n".encode())
        return 0

    group = workers.start(2, worker)
    while group.running:
        os.wait()
        group.reap()


# The test side


@contextlib.contextmanager
def mounted(
    tmp_path: Path, loop: str = "trio", register: str = "data", form: str = "packed"
) -> Iterator[Mount]:
    """Serve disk.raw from a child process running this file; yield the mount; unmount at the end."""
    data = tmp_path / "data"
    if not data.exists():
        data.write_bytes(data_bytes())
    (mountpoint := tmp_path / "mnt").mkdir()
    command: list[str | Path] = [sys.executable, __file__, mountpoint, data, loop, register, form]
    with daemon_mount(command, mountpoint, tmp_path / "fs.stderr") as served:
        yield served


class Reader:
    """disk.raw opened with O_DIRECT: every read reaches the file system, into a page-aligned buffer."""

    def __init__(self, mountpoint: Path) -> None:
        self.fd = os.open(mountpoint / NAME.decode(), os.O_RDONLY | os.O_DIRECT)
        self.buffer = mmap.mmap(-1, 8 * MiB)

    def read(self, offset: int, size: int) -> bytes:
        got = os.preadv(self.fd, [memoryview(self.buffer)[:size]], offset)
        return self.buffer[:got]

    def close(self) -> None:
        os.close(self.fd)
        self.buffer.close()


@contextlib.contextmanager
def reader(served: Mount) -> Iterator[Reader]:
    opened = Reader(served.mountpoint)
    try:
        yield opened
    finally:
        opened.close()


def control(served: Mount, name: str) -> dict[str, int]:
    """Read a control file (which does what its name says): the daemon's counts, as it answered."""
    result: dict[str, int] = json.loads((served.mountpoint / name).read_bytes())
    return result


def counted(served: Mount, read: Callable[[], object]) -> dict[str, int]:
    """Run `read` and return by how much each count moved meanwhile."""
    before = control(served, "status")
    read()
    after = control(served, "status")
    return {key: after[key] - before[key] for key in ("answered", "passed", "python")}


def edges() -> list[tuple[int, int]]:
    """(offset, size) reads at and around every extent edge, across holes, at and past the end; none
    larger than a request (1 MiB), nor of more than MAX_PIECES pieces (not inside the stripes)."""
    stripes = [(STRIPES, 200 * 99 + 100)]  # their outer edges only
    reads = []
    for offset, length in [*EXTENTS[:4], *stripes, *EXTENTS[-2:]]:
        for edge in (offset, offset + length):
            for start, size in (
                (edge - 1, 2),
                (edge, 1),
                (edge - 1, 1),
                (edge - 4_096, 8_192),
                (edge, 4_096),
            ):
                if start >= 0:
                    reads.append((start, size))
    return [*reads, (0, 64 * 1024), (0, MiB), (SIZE - 100, 200), (SIZE, 4_096), (SIZE + 10, 1)]


def wait_blocked_in_fuse_read(pid: int) -> None:
    """Wait until `pid` sleeps in read(2) of the FUSE device: a signal then finds it in C, not in Python."""
    wchan, seen = Path(f"/proc/{pid}/wchan"), set()
    deadline = time.monotonic() + 10
    while (where := wchan.read_text()) != "fuse_dev_do_read":
        seen.add(where)
        if time.monotonic() > deadline:
            if seen <= {"", "0"}:  # "0" while it runs, and always where the kernel hides it
                pytest.skip("/proc/PID/wchan does not say where a process sleeps here")
            raise AssertionError(f"the daemon does not wait in fuse_dev_do_read but in {seen}")
        time.sleep(0.001)


LOOPS = ["trio", "direct", "shared"]


@pytest.mark.parametrize(("loop", "form"), [*((loop, "packed") for loop in LOOPS), ("trio", "tuples")])
def test_reads_are_answered_in_c_with_the_bytes_of_the_map(tmp_path: Path, loop: str, form: str) -> None:
    with mounted(tmp_path, loop, form=form) as served, reader(served) as opened:
        moved = counted(served, lambda: [opened.read(offset, size) for offset, size in edges()])
        got = [(offset, size, opened.read(offset, size)) for offset, size in edges()]
    assert [(offset, size) for offset, size, data in got if data != image()[offset : offset + size]] == []
    assert moved == {"answered": len(edges()), "passed": 0, "python": 0}


def test_a_read_of_too_many_pieces_goes_to_python(tmp_path: Path) -> None:
    # From STRIPES on, 100 bytes of data then 100 of hole: 6,400 bytes are MAX_PIECES pieces
    with mounted(tmp_path) as served, reader(served) as opened:
        at_most = counted(served, lambda: opened.read(STRIPES, MAX_PIECES * 100))
        one_more = counted(served, lambda: opened.read(STRIPES, MAX_PIECES * 100 + 1))
        assert opened.read(STRIPES - 50, 20_000) == image()[STRIPES - 50 : STRIPES + 19_950]
    assert at_most == {"answered": 1, "passed": 0, "python": 0}
    assert one_more == {"answered": 0, "passed": 1, "python": 1}


def test_a_malformed_map_is_refused_whole(tmp_path: Path) -> None:
    with mounted(tmp_path) as served, reader(served) as opened:
        refused = control(served, "malformed")["refused"]
        kept = counted(served, lambda: opened.read(SIZE - 5_000, 5_000))  # the entry made at open stays
        kept_data = opened.read(SIZE - 5_000, 5_000)
        control(served, "unregister")
        control(served, "malformed")
        none = counted(served, lambda: opened.read(SIZE - 5_000, 5_000))  # and none is made without it
    assert refused == len(malformed())
    assert kept == {"answered": 1, "passed": 0, "python": 0}
    assert kept_data == image()[SIZE - 5_000 :]
    assert none == {"answered": 0, "passed": 0, "python": 1}


def test_unregistered_the_handle_is_read_by_python_again(tmp_path: Path) -> None:
    with mounted(tmp_path) as served, reader(served) as opened:
        assert counted(served, lambda: opened.read(1_000, 4_096))["answered"] == 1
        control(served, "unregister")
        python = counted(served, lambda: opened.read(1_000, 4_096))
        assert opened.read(1_000, 4_096) == image()[1_000:5_096]
        control(served, "register")
        again = counted(served, lambda: opened.read(1_000, 4_096))
    assert python == {"answered": 0, "passed": 0, "python": 1}
    assert again == {"answered": 1, "passed": 0, "python": 0}


@pytest.mark.parametrize("loop", LOOPS)
def test_a_sigio_handler_that_clears_the_table_runs_before_the_next_read(tmp_path: Path, loop: str) -> None:
    with mounted(tmp_path, loop) as served, reader(served) as opened:
        assert counted(served, lambda: opened.read(8_000, 4_096))["answered"] == 1
        before = control(served, "status")
        if loop == "shared":
            wait_blocked_in_fuse_read(served.process.pid)
        os.kill(served.process.pid, signal.SIGIO)
        data = opened.read(8_000, 4_096)
        after = control(served, "status")
        served.wait_for_log("SIGIO: cleared")
    assert data == image()[8_000:12_096]
    assert (after["answered"] - before["answered"], after["python"] - before["python"]) == (0, 1)


@pytest.mark.parametrize(
    "register", ["badfd", "short", "eio"], ids=["closed descriptor", "short read", "read error"]
)
def test_a_read_that_fails_in_c_is_answered_by_python(tmp_path: Path, register: str) -> None:
    with contextlib.ExitStack() as stack:
        if register == "short":  # the data of the last extent is missing
            (short := tmp_path / "short").write_bytes(data_bytes()[: layout()[-1][2] + 10])
            register = str(short)
        elif register == "eio":  # bad sectors under the data of EXTENTS[1]
            (tmp_path / "storage").mkdir()
            (tmp_path / "data").write_bytes(data_bytes())
            bad = layout()[1][2] + 100
            storage = stack.enter_context(faulty_storage(tmp_path / "data", tmp_path / "storage", (bad, 1)))
            register = str(storage.archive)
        served = stack.enter_context(mounted(tmp_path, register=register))
        opened = stack.enter_context(reader(served))
        failing = (SIZE - 5_000, 5_000) if "short" in register else (8_000, 8_192)
        moved = counted(served, lambda: opened.read(*failing))
        data = opened.read(*failing)
        good = counted(served, lambda: opened.read(0, 2_000))  # a hole and the first extent: fine
    assert data == image()[failing[0] : failing[0] + failing[1]]
    assert moved == {"answered": 0, "passed": 1, "python": 1}
    if register == "badfd":
        assert good == {"answered": 0, "passed": 1, "python": 1}
    else:
        assert good == {"answered": 1, "passed": 0, "python": 0}


def test_without_registration_python_reads_as_it_always_did(tmp_path: Path) -> None:
    with mounted(tmp_path, register="none") as served, reader(served) as opened:
        moved = counted(served, lambda: [opened.read(offset, size) for offset, size in edges()])
        got = [(offset, size, opened.read(offset, size)) for offset, size in edges()]
    assert [(offset, size) for offset, size, data in got if data != image()[offset : offset + size]] == []
    assert moved == {"answered": 0, "passed": 0, "python": len(edges())}


def hammer(mountpoint: Path, reads: int, seed: int, errors: list[BaseException]) -> None:
    """Read `reads` random 4 KiB blocks with O_DIRECT, checking each; a failure goes to `errors`."""
    rng = random.Random(seed)
    try:
        opened = Reader(mountpoint)
        try:
            for _ in range(reads):
                offset = rng.randrange(0, SIZE, 4_096)
                if opened.read(offset, 4_096) != image()[offset : offset + 4_096]:
                    raise AssertionError(f"wrong bytes at {offset}")
        finally:
            opened.close()
    except (OSError, AssertionError) as error:
        errors.append(error)


def read_in_threads(mountpoint: Path, threads: int, reads: int) -> list[BaseException]:
    """`threads` readers at once, `reads` each; return what failed."""
    image()  # computed once, before they start
    errors: list[BaseException] = []
    running = [threading.Thread(target=hammer, args=(mountpoint, reads, n, errors)) for n in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return errors


def test_queued_reads_are_answered_without_a_wait_between_at_most_64(tmp_path: Path) -> None:
    with mounted(tmp_path, "direct") as served:
        assert read_in_threads(served.mountpoint, 4, 2_000) == []
        status = control(served, "status")
    assert status["answered"] == 4 * 2_000
    assert status["waits"] < status["answered"] / 2  # most requests came while others were answered
    assert 1 < status["most_between_waits"] <= 64


def test_an_exception_from_a_signal_handler_leaves_the_read_unanswered_and_ends_main(tmp_path: Path) -> None:
    # The daemon sleeps in read(2) of the device, which SIGINT does not interrupt (SA_RESTART): the handler,
    # which raises KeyboardInterrupt, runs when pyfuse3 checks for signals before it answers the READ.
    with mounted(tmp_path, "shared") as served, reader(served) as opened:
        assert counted(served, lambda: opened.read(0, 4_096))["answered"] == 1
        wait_blocked_in_fuse_read(served.process.pid)
        os.kill(served.process.pid, signal.SIGINT)
        try:
            answer: bytes | str = opened.read(0, 4_096)
        except OSError as error:
            answer = errno.errorcode.get(error.errno or 0, str(error))
        assert served.process.wait(10) != 0
        assert not is_mounted(served.mountpoint)
    log = served.stderr_text()
    assert answer in ("ENOTCONN", "ECONNABORTED"), log  # the daemon ended without an answer
    assert "KeyboardInterrupt" in log
    assert '"answered": 1,' in log  # the count at exit: the READ after the signal was not answered in C


@pytest.mark.parametrize("loop", ["trio", "direct"])
def test_sigint_while_reads_keep_the_loop_busy_stops_the_daemon(tmp_path: Path, loop: str) -> None:
    # trio's own SIGINT handling (KeyboardInterrupt out of trio.run), with the loop answering in C
    with mounted(tmp_path, loop) as served:
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=hammer, args=(served.mountpoint, 10**9, n, errors)) for n in range(4)
        ]
        for thread in threads:
            thread.start()
        try:
            while control(served, "status")["answered"] < 2_000:
                assert not errors
            os.kill(served.process.pid, signal.SIGINT)
            assert served.process.wait(10) != 0
        finally:
            for thread in threads:
                thread.join(10)
        assert not is_mounted(served.mountpoint)
    assert "KeyboardInterrupt" in served.stderr_text()
    assert len(errors) == 4  # every reader stopped at a read that failed: the daemon is gone
    assert all(isinstance(error, OSError) for error in errors), errors


def test_forked_workers_answer_in_c_from_their_own_registration(tmp_path: Path) -> None:
    # Each worker clears what it inherited and registers again, as tarfuse does; they share one device fd
    with mounted(tmp_path, "workers") as served:
        assert read_in_threads(served.mountpoint, 4, 2_000) == []
    lines = [line for line in served.stderr_text().splitlines() if "counts:" in line]
    counts = [json.loads(line.split("counts:", 1)[1]) for line in lines]  # two workers', then the main's
    assert sum(count["answered"] for count in counts) == 4 * 2_000, lines
    assert [count["passed"] + count["python"] for count in counts] == [0, 0, 0], lines


if __name__ == "__main__":
    serve(*sys.argv[1:])
