"""ratarmount's own s3:// support (fsspec's s3fs) on moto's S3 server behind the kit's recording proxy, next
to tarfuse (scripts/bench/fleet.py): a cold mount of an s3:// .tar.gz holding disk.raw, to its first sector.

ratarmount 1.3 (ratarmountcore 0.11) hands an s3:// URL to `fsspec.url_to_fs`, that is to s3fs (not a
dependency of plain `pip install ratarmount`: install() adds it). s3fs takes the endpoint from fsspec's
config, here the environment variable FSSPEC_S3_ENDPOINT_URL (http:// works as is), and the credentials
and region from boto's AWS_ variables. It is run as peers.py runs it: `ratarmount -f --index-file :memory:
s3://BUCKET/KEY MOUNTPOINT`, so every mount indexes afresh. To index a .tar.gz it decompresses all of it,
so it reads the whole object before the mount is live.

`python -m scripts.bench.ratarmount_s3 [MiB]` (default 64), as root (FUSE): starts moto, puts a .tar.gz of
random data, and prints cold_mount's figures, then tarfuse's for the same object (no published index).
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from kit.mounts import MountError, stop_daemon, unmount
from kit.objectstores import ObjectStore, running_store

from .harness import run_main, scratch
from .host import CACHE, venv_install

VENV = CACHE / "venv-ratarmount"
RATARMOUNT = VENV / "bin" / "ratarmount"
MiB = 1 << 20
SECTOR = 512
LIVE_TIMEOUT_S = 900.0  # indexing decompresses all of it: minutes for a GiB through s3fs on a slow machine
POLL_S = 0.05
EXIT_TIMEOUT_S = 30.0


def install() -> str | None:
    """Make sure ratarmount with s3 support (s3fs) is in its bench venv (pip install into
    ~/.cache/tarfuse-bench/venv-ratarmount, as peers.py does, adding s3fs); return None if ready, or why it
    cannot be (one line)."""
    try:
        venv_install(VENV, "ratarmount", "ratarmount", "s3fs")  # a no-op when ratarmount is there
        python = str(VENV / "bin" / "python")
        if subprocess.run([python, "-c", "import s3fs"], capture_output=True, check=False).returncode:
            print(f"installing s3fs into {VENV}", flush=True)
            pip = [str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "s3fs"]
            subprocess.run(pip, check=True)
        subprocess.run([python, "-c", "import s3fs"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot install ratarmount with s3fs into {VENV}: {exc}"
    return None


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def _wait_live(mnt: Path, disk: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the mount point is mounted and shows disk.raw; raise MountError if ratarmount ends first or the
    deadline passes."""
    deadline = time.monotonic() + LIVE_TIMEOUT_S
    while not (os.path.ismount(mnt) and disk.exists()):
        if (status := process.poll()) is not None:
            raise MountError(f"ratarmount exited with {status} before serving {disk}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise MountError(f"{disk} not served after {LIVE_TIMEOUT_S:g} s:\n{_tail(log)}")
        time.sleep(POLL_S)


def _describe(requests: list, size: int | None) -> str:
    """The requests in a few words: how many of each method, and how much of the object they fetched."""
    methods: dict[str, int] = {}
    for request in requests:
        methods[request.method] = methods.get(request.method, 0) + 1
    counts = ", ".join(f"{n} {method}" for method, n in sorted(methods.items()))
    ranged = sum(1 for r in requests if r.method == "GET" and r.range)
    sent = sum(r.sent for r in requests)
    if not size:
        return f"{counts} ({ranged} ranged GETs), {sent / MiB:.1f} MiB"
    return (
        f"{counts} ({ranged} ranged GETs), {sent / MiB:.1f} MiB = {sent / size:.2f}x the object, "
        f"covering {_covered(requests, size) / size:.0%} of its bytes"
    )


def _covered(requests: list, size: int) -> int:
    """How many of the object's bytes the GETs fetched at least once (their ranges' union)."""
    spans = []
    for request in requests:
        if request.method != "GET" or request.path.count("/") < 2:  # a listing, not the object
            continue
        match = re.fullmatch(r"bytes=(\d+)-\d*", request.range or "bytes=0-")
        if match:
            spans.append((int(match[1]), int(match[1]) + request.sent))
    covered, end = 0, 0
    for first, last in sorted(spans):
        covered += max(0, min(last, size) - max(first, end))
        end = max(end, last)
    return covered


def cold_mount(store: ObjectStore, key: str, work: Path, env: dict[str, str]) -> tuple[int, int, float, str]:
    """Mount store.url(key) (an s3:// .tar.gz holding disk.raw) with ratarmount, cold (an empty index cache:
    --index-file :memory: or a fresh directory), pointing it at store.endpoint (the proxy) with store.env
    credentials; read the first 512 bytes of disk.raw; return (requests, bytes the proxy served, seconds
    from start to the first sector read, a note on what ratarmount did, e.g. whether it fetched the whole
    object), then unmount (fusermount3 -u) and make sure the process ended."""
    mnt = work / "mnt-ratarmount"
    mnt.mkdir(exist_ok=True)
    log = work / "ratarmount.log"
    disk = mnt / "disk.raw"
    size = _object_size(store, key)
    child_env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    child_env |= store.env | {
        "FSSPEC_S3_ENDPOINT_URL": store.endpoint,  # s3fs's endpoint_url, from fsspec's config
        "AWS_DEFAULT_REGION": store.env.get("AWS_REGION", "us-east-1"),
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probes: the credentials are in env
    }
    command = [RATARMOUNT, "-f", "--index-file", ":memory:", store.url(key), mnt]
    store.proxy.reset()
    start = time.monotonic()
    with log.open("wb") as sink:  # as kit.mounts.start_daemon starts a daemon, with this environment
        process = subprocess.Popen(
            [str(word) for word in command], stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
            env=child_env, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_live(mnt, disk, process, log)
        live = time.monotonic() - start
        at_live = store.proxy.requests
        with disk.open("rb", buffering=0) as image:
            first = image.read(SECTOR)
        seconds = time.monotonic() - start
        if len(first) != SECTOR:
            raise MountError(f"read {len(first)} bytes of {disk}'s first sector")
        asked = store.proxy.requests
        requests, served = len(asked), sum(r.sent for r in asked)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        stop_daemon(process, grace=EXIT_TIMEOUT_S, group=True)
        unmount(mnt)  # if it had to be killed, its mount is left: lazily
    after = store.proxy.requests
    note = (
        f"mount live after {live:.2f} s having fetched {_describe(at_live, size)}; "
        f"to the first sector {_describe(asked, size)}"
    )
    if len(after) != len(asked):
        note += f"; by its exit {_describe(after, size)}"
    return requests, served, seconds, note


def _object_size(store: ObjectStore, key: str) -> int | None:
    try:
        import obstore

        return int(obstore.head(store.store(store.upstream), key)["size"])
    except Exception:  # the size only words the note
        return None


def tarfuse_cold_mount(
    store: ObjectStore, key: str, work: Path, env: dict[str, str]
) -> tuple[int, int, float]:
    """tarfuse on the same object, as fleet.py measures it without a published index: (requests, bytes,
    seconds to the first sector)."""
    from .fleet import mounted, replay

    host_env = {**env, **store.env, "XDG_CACHE_HOME": str(work / "cache-tarfuse")}
    store.proxy.reset()
    start = time.monotonic()
    with mounted(store, key, work / "mnt-tarfuse", host_env):
        replay(work / "mnt-tarfuse" / "disk.raw", [(0, SECTOR)])
        seconds = time.monotonic() - start
        asked = store.proxy.requests
    return len(asked), sum(r.sent for r in asked), seconds


def main() -> int:
    from .fleet import tar_gz

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mib", nargs="?", type=int, default=64, help="the image's size in MiB (default 64)")
    args = parser.parse_args()
    if (why := install()) is not None:
        print(why, file=sys.stderr)
        return 1
    version = subprocess.run([RATARMOUNT, "--version"], capture_output=True, text=True, check=False)
    print(version.stdout.splitlines()[0] if version.stdout else "ratarmount (version unknown)")
    with scratch("tarfuse-ratarmount-s3-") as work, running_store("s3", work) as store:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "AZURE_"))}
        archive = tar_gz(work, "random", args.mib * MiB, compressible=False)
        key = archive.name
        store.put(key, archive)
        print(f"{key}: {args.mib} MiB image, {archive.stat().st_size / MiB:.1f} MiB compressed", flush=True)
        print("ratarmount:", cold_mount(store, key, work, env), flush=True)
        requests, served, seconds = tarfuse_cold_mount(store, key, work, env)
        print(f"tarfuse (no published index): {requests} requests, {served / MiB:.1f} MiB, {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
