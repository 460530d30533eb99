"""FUSE daemons for the tests and the scripts: start one in the foreground, wait for its mount, probe it,
unmount it, stop it. tests/conftest.py, scripts/demo.py, scripts/stress.py and the benchmark harness
(scripts/bench) all go through here.

Mounts are looked up in /proc/self/mountinfo (tarfuse.serve.daemon.find_mount), never by stat()ing the mount
point: that would hang, in the kernel where no timeout reaches, on a daemon that does not answer.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tarfuse.serve import mountinfo
from tarfuse.serve.daemon import find_mount

MOUNT_TIMEOUT = 10.0
LOG_TIMEOUT = 60.0  # seconds a daemon may take to log what a test waits for (a background pass's end)
EXIT_TIMEOUT = 10.0  # seconds a daemon may take to exit once its mount is gone
_POLL_S = 0.01
_LOG_POLL_S = 0.05

Command = Sequence[str | Path]


class MountError(Exception):
    """A daemon did not mount, did not answer, or its mount did not go away; the message says which."""


def fuse_unusable_reason() -> str | None:
    """Say why FUSE mounts cannot work here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def mount_entry(path: str | Path) -> mountinfo.Mount | None:
    """Return the topmost mount on `path` (a directory or a file), or None."""
    return mountinfo.find(path)


def is_mounted(path: str | Path) -> bool:
    return find_mount(str(path)) is not None


def tarfuse_command(*args: str | Path) -> list[str]:
    """`tarfuse ARGS...`, run by this interpreter: the checkout's tarfuse, whatever is on PATH."""
    return [sys.executable, "-m", "tarfuse", *map(str, args)]


@dataclass(frozen=True, slots=True)
class Mount:
    """A foreground daemon serving a mount point; `stderr` is the file its output goes to."""

    process: subprocess.Popen[bytes]
    mountpoint: Path
    stderr: Path

    def stderr_text(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_for_log(
        self, text: str | tuple[str, ...], timeout: float = LOG_TIMEOUT, fails_on: Sequence[str] = ()
    ) -> str:
        """Return the daemon's log once it holds `text` (or one of several). Fail with the log as soon as
        the daemon has ended or the log holds one of `fails_on` without `text`, or after `timeout` s."""
        deadline = time.monotonic() + timeout
        wanted = (text,) if isinstance(text, str) else text
        while not any(one in (log := self.stderr_text()) for one in wanted):
            assert self.process.poll() is None, log
            assert not [fail for fail in fails_on if fail in log], log
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{log}"
            time.sleep(_LOG_POLL_S)
        return log

    def unmount(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Unmount with `fusermount3 -u` (not lazily: it fails while the mount is busy), then wait for the
        daemon to exit; return its exit status."""
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=True)
        return self.process.wait(timeout)


MountFactory = Callable[..., Mount]


def start_daemon(
    command: Command, log: Path, *, append: bool = False, new_session: bool = False, cwd: str | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` with its output in `log` and no stdin; `new_session` makes its process group ours."""
    with log.open("ab" if append else "wb") as sink:
        return subprocess.Popen(
            [str(word) for word in command],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            cwd=cwd,
            start_new_session=new_session,
        )


def wait_for_mount(
    path: str | Path,
    process: subprocess.Popen[bytes],
    log: Path,
    *,
    timeout: float = MOUNT_TIMEOUT,
    probe: bool = True,
) -> None:
    """Wait until `path` is a mount point (that answers, if `probe`); raise MountError, with the log, if the
    daemon exits first or the time is up.

    Mounted is not serving: a daemon that never answers would hang the caller at its first stat. So the probe
    stats the mount point from a child process, which can be killed. Without `probe` (a mount that this
    process may not look into: another user's, without allow_other), mounted is enough.
    """
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if (status := process.poll()) is not None:
            raise MountError(f"the daemon exited with {status} before mounting {path}:\n" + _text(log))
        if time.monotonic() > deadline:
            raise MountError(f"{path} not mounted after {timeout:g} s:\n" + _text(log))
        time.sleep(_POLL_S)
    if probe:
        try:
            subprocess.run(["stat", str(path)], check=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MountError(f"{path} is mounted but the daemon does not answer:\n" + _text(log)) from None


def unmount(path: str | Path) -> None:
    """Lazily unmount everything mounted on `path` (mounts can stack); quiet if nothing is.

    Raises:
        MountError: something is still mounted there.
    """
    for _ in range(5):
        if not is_mounted(path):
            return
        result = subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)
        if result.returncode != 0:  # not a FUSE mount, or not ours to fusermount
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
    if is_mounted(path):
        raise MountError(f"could not unmount {path}")


def stop_daemon(process: subprocess.Popen[bytes], *, grace: float = 5.0, group: bool = False) -> None:
    """Wait for a daemon whose mount is gone; terminate it, then kill it, if it lingers.

    `group`: the daemon was started in a session of its own (start_daemon's `new_session`); kill what is
    left of its process group too (nbdfuse's nbdkit, say).
    """
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if group:
        kill_group(process)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a daemon started with `new_session` (its pid is the group's id)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def finish(
    mountpoint: Path, process: subprocess.Popen[bytes], *, grace: float = 5.0, group: bool = False
) -> None:
    """Unmount, let the daemon exit (or end it), and unmount again: a daemon still starting may have mounted
    meanwhile, and one that had to be killed leaves its mount behind."""
    try:
        unmount(mountpoint)
    finally:
        stop_daemon(process, grace=grace, group=group)
    unmount(mountpoint)


@contextlib.contextmanager
def daemon_mount(
    command: Command,
    mountpoint: Path,
    log: Path | None = None,
    *,
    timeout: float = MOUNT_TIMEOUT,
    probe: bool = True,
    cwd: str | None = None,
) -> Iterator[Mount]:
    """Run the FUSE daemon `command` in the foreground until the block ends, then unmount and stop it.

    Its output goes to `log`, by default MOUNTPOINT.stderr next to the mount point.
    """
    log = log if log is not None else mountpoint.parent / f"{mountpoint.name}.stderr"
    process = start_daemon(command, log, cwd=cwd)
    try:
        wait_for_mount(mountpoint, process, log, timeout=timeout, probe=probe)
        yield Mount(process, mountpoint, log)
    finally:
        finish(mountpoint, process)


def foreground_mount(
    archive: str | Path,
    mountpoint: Path,
    *options: str,
    log: Path | None = None,
    timeout: float = MOUNT_TIMEOUT,
) -> contextlib.AbstractContextManager[Mount]:
    """Run `tarfuse -f ARCHIVE MOUNTPOINT OPTIONS...` until the block ends, then unmount."""
    return daemon_mount(
        tarfuse_command("-f", archive, mountpoint, *options), mountpoint, log, timeout=timeout
    )


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """Attach `image` read-only to a free loop device (root only); always detach it."""
    device = subprocess.run(
        ["losetup", "-r", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


@contextlib.contextmanager
def read_only_bind(directory: Path, view: Path) -> Iterator[Path]:
    """Bind-mount `directory` read-only on `view` (root only): a place where nothing can be written, with
    a writable way in beside it; unmounted (lazily) at the end."""
    subprocess.run(["mount", "--bind", directory, view], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", view], check=True)
        yield view
    finally:
        subprocess.run(["umount", "-l", view], check=False)


def status_kib(pid: int | str, key: str) -> int:
    """A "kB" line of /proc/PID/status (VmRSS, VmHWM...), in KiB; `pid` may be "self"."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
    raise LookupError(f"no {key} in /proc/{pid}/status")


# Runs `python -m tarfuse ARGS...` and writes its peak RSS (VmHWM, in kB) to the file named by $PEAK_FILE.
_WITH_PEAK = """
import atexit, os, runpy

def _peak():
    with open("/proc/self/status") as status, open(os.environ["PEAK_FILE"], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

atexit.register(_peak)
runpy.run_module("tarfuse", run_name="__main__", alter_sys=True)
"""


def run_tarfuse_measuring_peak_rss(
    *args: str | Path, scratch: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `tarfuse ARGS...` to its end; return the result and its peak RSS in bytes.

    Not the rusage of the child: a child's ru_maxrss starts at the RSS of the process that spawned it
    (Linux keeps the high-water mark across exec), and a pytest process deep in the suite holds hundreds
    of MiB. VmHWM, read by the child itself as it exits, is its own.
    """
    peak_file = scratch / f"peak.{os.getpid()}.{time.monotonic_ns()}"
    result = subprocess.run(
        [sys.executable, "-c", _WITH_PEAK, *map(str, args)],
        capture_output=True,
        text=True,
        env={**(env if env is not None else os.environ), "PEAK_FILE": str(peak_file)},
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    return result, int(peak_file.read_text()) * 1024


def _text(log: Path) -> str:
    return log.read_text(errors="replace")
