"""The mount's life: mount, detach from the terminal, serve until unmounted or signalled, unmount.

Mount first, then fork (as libfuse's fuse_daemonize does): mount errors still reach the terminal and the exit
status, and the parent returns only once the mount is live and the child's event loop has started.
Never fork while trio runs.
"""

import errno
import functools
import logging
import logging.handlers
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from tarfuse.errors import UsageError
from tarfuse.printable import PrintableFormatter
from tarfuse.serve import eventloop, mountinfo, workers
from tarfuse.serve.fs import ImageFs
from tarfuse.served import BackgroundJob

log = logging.getLogger(__name__)

_READY = b"\x01"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class MountFailed(Exception):
    """libfuse could not mount (its own message went to stderr)."""


_PROGRESS_TTY = 1.0  # seconds between progress updates on a terminal
_PROGRESS_LOG = 30.0  # ... and between log lines otherwise


@dataclass(frozen=True, slots=True)
class MountPoint:
    """The mount point, held by a descriptor from the moment the command names it until mount(2).

    Between the two, the archive is scanned, for as long as its author likes. Resolving the path again at
    mount time would let whoever can write a parent directory swap the mount point for a symlink to a
    directory of root's choosing (the mount would hide it, or serve the image in its place): so root mounts
    on the pinned inode itself (/proc/self/fd/N), and any caller refuses a path that no longer leads to it.
    """

    path: str  # absolute, without symlinks: what /proc/self/mountinfo will show
    fd: int  # O_PATH: pins the inode without opening it for I/O
    is_file: bool  # a file mount point: the mount is the image itself
    device: int
    inode: int

    def target(self, options: set[str]) -> str:
        """What to hand libfuse: the pinned inode when it calls mount(2) itself (root, no auto_unmount).

        fusermount3 (users, and auto_unmount) resolves the path on its own and does not accept another
        process's descriptor; it checks that the user may write there, and `check_unchanged` went first.
        The descriptor stays open for the daemon's life: libfuse unmounts by the path it mounted.
        """
        if os.geteuid() == 0 and "auto_unmount" not in options:
            return f"/proc/self/fd/{self.fd}"
        return self.path

    def check_unchanged(self) -> None:
        """Refuse to mount if the path now leads somewhere else (replaced, moved, or a symlink put there)."""
        try:
            now = os.stat(self.path)
        except OSError as exc:
            raise UsageError(
                f"mount point {self.path} changed while the archive was read: {exc.strerror}"
            ) from None
        if (now.st_dev, now.st_ino) != (self.device, self.inode):
            raise UsageError(
                f"mount point {self.path} was replaced while the archive was read; refusing to mount"
            )


def pin_mountpoint(path: str) -> MountPoint:
    """Open the mount point as the command names it (symlinks in it are the caller's); refuse a bad one.

    A stale FUSE mount (its daemon died) and one already mounted are refused with what to do.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(_mountpoint_problem(path, exc)) from None
    try:
        info = os.fstat(fd)
        resolved = os.readlink(f"/proc/self/fd/{fd}")
        if find_mount(resolved) is not None:
            raise UsageError(
                f"{resolved} is already a mount point; unmount it first (fusermount3 -u {resolved})"
            )
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            raise UsageError(f"mount point {path} must be a directory or a regular file")
    except OSError as exc:
        os.close(fd)
        raise UsageError(_mountpoint_problem(path, exc)) from None
    except BaseException:
        os.close(fd)
        raise
    return MountPoint(resolved, fd, stat.S_ISREG(info.st_mode), info.st_dev, info.st_ino)


def _mountpoint_problem(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOTCONN:
        return f"{path}: a stale FUSE mount is there (its daemon died); clear it with fusermount3 -u {path}"
    return f"mount point {path}: {exc.strerror}"


def mount(ops: ImageFs, mountpoint: MountPoint, options: set[str]) -> None:
    """Mount, or raise MountFailed; libfuse prints the reason itself.

    The stop signals are held back from here until serve() listens for them: one that came in between
    would end the process by default and leave the mount with no daemon ("Transport endpoint is not
    connected"); held back, it unmounts cleanly as soon as the loop runs.
    """
    mountpoint.check_unchanged()
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pyfuse3.init(ops, mountpoint.target(options), options)
    except RuntimeError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        raise MountFailed(str(exc)) from None


def find_mount(path: str) -> str | None:
    """Return the device ("major:minor") of the topmost mount at `path`, or None if none is there.

    `path` must be resolved *before* mounting: once our mount is there, any stat of it waits for our own
    loop.
    """
    try:
        found = mountinfo.find(path)
    except OSError:
        return None
    return None if found is None else found.device


def tune_readahead(mountpoint: str, kib: int) -> None:
    """Raise the mount's readahead so the kernel sends 1 MiB reads, several at a time.

    pyfuse3 cannot ask for it at FUSE init; the bdi sysfs knob can, for root. Measured on 2 vCPUs:
    with the kernel's 128 KiB default, sequential reads come as many small requests, each a round trip
    through the daemon (figures: docs/benchmarks.md, "Levers, measured").
    """
    device = find_mount(mountpoint)
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w", encoding="ascii") as knob:
            knob.write(str(kib))
    except OSError as exc:
        log.debug("could not set read_ahead_kb of %s: %s (sequential reads will be slower)", device, exc)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a mount is, for the daemon: where it is, how many requests and processes serve it, and what
    runs beside and before the serving (all of it the assembly's and ImageFs's)."""

    mountpoint: str  # the resolved path (MountPoint.path)
    foreground: bool = False  # stay attached to the terminal (-f)
    tasks: int = 1  # the most requests pyfuse3 serves at once in one process
    processes: int = 1  # > 1: the INIT is answered first, then that many workers are forked (workers.py)
    background: BackgroundJob | None = None  # a compressed archive's pass, in a thread of the main process
    before_wait: Callable[[], None] = lambda: (
        None
    )  # before each wait for a request (ImageFs.after_init_replied)
    init_replied: Callable[[], bool] = lambda: True  # whether the INIT is answered (ImageFs.init_replied)
    before_serving: Callable[[], None] = lambda: None  # in each serving process (Assembly.before_serving)
    title: str = "tarfuse"  # the command, for ps


def serve(plan: Plan) -> int:
    """Run the mounted file system until it is unmounted or a stop signal comes; return the exit status:
    1 if the last worker died rather than ended (the mount is taken away), else 0."""
    foreground, mountpoint, processes, title = plan.foreground, plan.mountpoint, plan.processes, plan.title
    ready_fd = None
    if not foreground:
        try:
            ready_fd = _detach()  # returns only in the child
        except BaseException:
            pyfuse3.close(unmount=True)  # no daemon will serve this mount: take it away
            raise
    device = find_mount(mountpoint)
    clean = aborted = False
    group = None
    try:
        if processes > 1 and trio.run(_answer_init, plan.before_wait, plan.init_replied):
            workers.set_title("main", title)
            keep = () if ready_fd is None else (ready_fd,)
            group = workers.start(
                processes, lambda n: _serve_as_worker(n, processes, title, plan.before_serving), keep
            )
        else:
            plan.before_serving()
        aborted = trio.run(_run_until_unmounted, ready_fd, plan, group)
        clean = True
    finally:
        if group is not None:
            group.stop()
        # After a crash, leave the mount in place (ENOTCONN) rather than an empty directory that
        # looks like a working, empty mount; the message tells how to clear it.
        pyfuse3.close(unmount=clean)
    if clean and device is not None and find_mount(mountpoint) == device:
        _unmount_aborted(mountpoint, aborted)
    log.info("unmounted, exiting")
    return 1 if group is not None and group.last_died else 0


def _unmount_aborted(mountpoint: str, seen: bool) -> None:
    """Take away a mount whose connection was aborted, which libfuse leaves in place (ENOTCONN).

    libfuse's unmount sees POLLERR on the aborted connection and assumes the kernel unmounted already.
    """
    if not seen:
        log.info("the FUSE connection was aborted")
    result = subprocess.run(
        ["fusermount3", "-u", "-z", "-q", mountpoint], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        log.warning("could not unmount %s: %s", mountpoint, result.stderr.strip() or result.returncode)


async def _answer_init(before_wait: Callable[[], None], init_replied: Callable[[], bool]) -> bool:
    """Serve until the FUSE INIT is answered; return False if the session ended or a stop signal came."""
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(_terminate_on_signal, "unmounting", stopped)
        await _serve_requests(1, direct=False, before_wait=before_wait, until=init_replied)
        nursery.cancel_scope.cancel()
    return init_replied() and not stopped.is_set()


def _serve_as_worker(number: int, size: int, title: str, before_serving: Callable[[], None]) -> int:
    workers.set_title(f"worker {number}/{size}", title)
    stopping = workers.stop_flag(_STOP_SIGNALS)
    before_serving()
    log.debug("worker %d (pid %d) serving", number, os.getpid())
    trio.run(functools.partial(_serve_requests, 1, direct=True, until=stopping, shared=True))
    if stopping():
        log.debug("worker %d stopping", number)
    return 0


async def _run_until_unmounted(ready_fd: int | None, plan: Plan, group: workers.Group | None) -> bool:
    """Serve until the session ends; return whether the kernel aborted the connection.

    With a group, the workers serve and this process watches them until none is left.
    """
    done = trio.Event()  # with a group: a stop signal came, or no worker is left
    async with trio.open_nursery() as nursery:
        await nursery.start(_terminate_on_signal, "unmounting", done)
        if plan.background is not None:
            nursery.start_soon(_run_in_background, plan.background)
        if group is not None:
            await nursery.start(_watch_workers, group, done)
        if ready_fd is not None:
            os.write(ready_fd, _READY)
            os.close(ready_fd)
        if group is None:
            log.info("serving")
            # One task when every handler runs to completion without awaiting (fs.py): more tasks only
            # add churn: fio's 4 KiB random reads were slower with pyfuse3's default of up to 99 than
            # with one (docs/benchmarks.md). Blocking sources need one task per reader thread.
            direct = plan.tasks == 1 and plan.background is None
            aborted = await _serve_requests(plan.tasks, direct, plan.before_wait)
        else:
            log.info("serving, %d worker processes", group.size)
            await done.wait()  # serve() then ends the workers that are left
            aborted = False
        nursery.cancel_scope.cancel()
    return aborted


async def _serve_requests(
    tasks: int,
    direct: bool,
    before_wait: Callable[[], None] = lambda: None,
    until: Callable[[], bool] | None = None,
    shared: bool = False,
) -> bool:
    """pyfuse3's loop, with our wait (eventloop.py); return whether the kernel aborted the connection."""
    eventloop.install(before_wait, direct=direct, until=until, shared=shared)
    aborted = False
    try:
        await pyfuse3.main(min_tasks=1, max_tasks=tasks)
    except* ConnectionAbortedError:
        # The kernel tore the connection down under a read that had already taken a request: an
        # abort through /sys/fs/fuse/connections/N/abort, or the end of a lazy unmount. The read
        # then fails with ECONNABORTED instead of ENODEV (fs/fuse/dev.c), which libfuse reports as
        # an error; either way nothing more will come and the session is over.
        log.info("the kernel closed the FUSE connection")
        aborted = True
    finally:
        eventloop.uninstall()
    return aborted


async def _watch_workers(
    group: workers.Group,
    all_ended: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Log each worker that ends while the mount is served, and set `all_ended` once none is left.

    Workers end at the unmount (each reads ENODEV) or die one by one; the others go on serving.
    """
    with trio.open_signal_receiver(signal.SIGCHLD) as ended:
        task_status.started()
        while True:
            for number, pid, status in group.reap():
                if os.waitstatus_to_exitcode(status) == 0:
                    log.debug("worker %d (pid %d) ended", number, pid)
                elif group.running:
                    log.warning(
                        "worker %d (pid %d) died (%s); %d of %d go on serving",
                        number,
                        pid,
                        workers.how_it_ended(status),
                        len(group.running),
                        group.size,
                    )
                else:
                    group.last_died = True
                    log.error(
                        "worker %d (pid %d) died (%s), the last one: unmounting",
                        number,
                        pid,
                        workers.how_it_ended(status),
                    )
            if not group.running:
                all_ended.set()
                return
            await ended.__anext__()


async def _run_in_background(job: BackgroundJob) -> None:
    """Run the job in a thread, with progress; at unmount, tell it to stop and wait until it has."""
    stop = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_report_progress, job, stop)
        try:
            await trio.to_thread.run_sync(job.run, stop)  # not abandoned: it must close its decoder
        finally:
            stop.set()
        nursery.cancel_scope.cancel()


async def _report_progress(job: BackgroundJob, stop: threading.Event) -> None:
    """On a terminal, one line rewritten in place; otherwise a log line now and then."""
    on_tty = sys.stderr.isatty()
    try:
        await trio.sleep(_PROGRESS_TTY if on_tty else _PROGRESS_LOG)
        while not stop.is_set() and not job.done():
            if on_tty:
                print(f"\r{job.status()}\033[K", end="", file=sys.stderr, flush=True)
            else:
                log.info("%s", job.status())
            await trio.sleep(_PROGRESS_TTY if on_tty else _PROGRESS_LOG)
    finally:
        stop.set()  # also when cancelled at unmount, which is how the worker thread learns it
        if on_tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


async def _terminate_on_signal(
    doing: str, stopped: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """End pyfuse3's loop at the first stop signal; log "got SIGTERM, `doing`" and set `stopped`."""
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        # Held back since mount(), and again between event loops: from now on they come here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        try:
            task_status.started()
            async for signum in signals:
                log.info("got %s, %s", signal.Signals(signum).name, doing)
                stopped.set()
                pyfuse3.terminate()
                await trio.sleep_forever()  # still here: a second signal must not kill the process
        finally:
            # Before the receiver goes: one that comes later waits for the next loop, or for none.
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _detach() -> int:
    """Fork; the parent waits for the child's "serving" byte and exits with 0, or 1 if none comes."""
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        status = 0 if os.read(read_fd, 1) == _READY else 1
        if status:
            print("tarfuse: the daemon died while starting; see the system log", file=sys.stderr)
            pyfuse3.close(unmount=True)
        os._exit(status)
    os.close(read_fd)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _log_to_syslog()
    return write_fd


def _log_to_syslog() -> None:
    """Detached, stderr goes nowhere: log to the journal/syslog instead, if there is one."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(PrintableFormatter("tarfuse[%(process)d]: %(message)s"))  # no raw names
        root.addHandler(handler)
