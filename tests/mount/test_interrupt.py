"""A stop signal before the mount is live: one line, exit status 128+signal, nothing mounted, no traceback.

The archive is a URL whose server holds its answer: tarfuse is then waiting for its first bytes, the
moment a user at the terminal gives up and presses Ctrl-C.
"""

import signal
import subprocess
import time
from pathlib import Path

import pytest
from kit.httpserver import RangeServer
from kit.mounts import is_mounted, tarfuse_command, unmount

WAIT_S = 60.0  # generous: the machine may be busy


@pytest.fixture
def held_server(server: RangeServer) -> RangeServer:
    """A server that takes each request and answers only long after the test is over."""
    server.faults.slow, server.faults.delay = -1, 3600.0
    return server


def _wait_for_a_request(server: RangeServer, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not server.requests:
        assert process.poll() is None, "tarfuse ended before it asked the server for anything"
        assert time.monotonic() < deadline, "tarfuse never asked the server for the archive"
        time.sleep(0.01)


@pytest.mark.fuse
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.parametrize("how", ["mount -f", "mount", "--list"])
def test_a_stop_signal_before_the_mount_is_live_is_one_line_and_128_plus_the_signal(
    held_server: RangeServer, tmp_path: Path, signum: signal.Signals, how: str
) -> None:
    url = held_server.put("vm.tar", bytes(1 << 20))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    words = {"mount -f": ["-f", url, mountpoint], "mount": [url, mountpoint], "--list": ["--list", url]}[how]
    process = subprocess.Popen(
        tarfuse_command(*words), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for_a_request(held_server, process)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        unmount(mountpoint)
    lines = stderr.decode(errors="replace").splitlines()
    expected = f"tarfuse: interrupted by {signum.name}" + ("" if how == "--list" else "; nothing mounted")
    assert lines == [expected]
    assert process.returncode == 128 + signum
    assert stdout == b""
    assert not is_mounted(mountpoint)
