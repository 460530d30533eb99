"""What the benches change on the host: the packages they install, and DAMON's reclaim, paused on request.

Programs come from Debian (apt-get, as root) or from PyPI into venvs under CACHE; nothing else on the
machine changes unless asked (`--pause-reclaim`), and that is restored at the end.
"""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .harness import ToolFailed

CACHE = Path(os.environ.get("TARFUSE_BENCH_CACHE", Path.home() / ".cache" / "tarfuse-bench"))
_KDAMONDS = Path("/sys/kernel/mm/damon/admin/kdamonds")
_apt_updated = False


def ensure_commands(*needed: tuple[str, tuple[str, ...]]) -> None:
    """For each (command, Debian packages) whose command is missing, install the first package Debian has."""
    global _apt_updated
    for command, packages in needed:
        if shutil.which(command) is not None:
            continue
        if os.geteuid() != 0:
            raise ToolFailed(f"{command} is missing; as root: apt-get install {packages[0]}")
        if not _apt_updated:
            subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
            _apt_updated = True
        for package in packages:
            policy = subprocess.run(
                ["apt-cache", "policy", package], capture_output=True, text=True, check=False
            )
            if "Candidate:" in policy.stdout and "Candidate: (none)" not in policy.stdout:
                print(f"installing Debian package {package} (for {command})", flush=True)
                env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
                install = ["apt-get", "install", "-y", "-qq", package]
                subprocess.run(install, check=True, env=env, stdout=subprocess.DEVNULL)
                if shutil.which(command) is not None:
                    break
        else:
            raise ToolFailed(f"no Debian package provides {command} here (tried {', '.join(packages)})")


def venv_install(venv: Path, program: str, *requirements: str) -> None:
    """Make `venv` with pip's `requirements` (default: `program`) unless its bin/`program` is there."""
    if (venv / "bin" / program).exists():
        return
    print(f"installing {' '.join(requirements or (program,))} into {venv}", flush=True)
    # From the interpreter this venv was made from: a venv of a venv would share nothing useful.
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base) if base.exists() else sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *(requirements or (program,))], check=True)


@contextmanager
def reclaim_paused(keep: bool) -> Iterator[str]:
    """Pause DAMON's proactive reclaim for the run unless `keep`; yield what the report says about it.

    Some VMs run a DAMON "pageout" scheme that evicts a warm archive from the page cache within seconds
    (docs/benchmarks.md, "The page cache on this machine"). Restored afterwards.
    """
    running = [d for d in sorted(_KDAMONDS.glob("[0-9]*")) if _read(d / "state") == "on"]
    if not running:
        yield "no proactive reclaim (DAMON) running"
        return
    if keep:
        yield "DAMON proactive reclaim left running: the archive may be evicted from the page cache"
        return
    try:
        for kdamond in running:
            (kdamond / "state").write_text("off\n")
    except OSError as exc:
        yield f"DAMON proactive reclaim running (could not pause it: {exc.strerror})"
        return
    print(f"paused DAMON proactive reclaim ({len(running)} kdamond) for the run", flush=True)
    try:
        yield "DAMON proactive reclaim paused for the run (it evicts a warm archive within seconds here)"
    finally:
        for kdamond in running:
            with suppress(OSError):
                (kdamond / "state").write_text("on\n")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
