"""Show tarfuse end to end (`make demo`): a bootable disk in a tar archive, mounted, booted, overlaid.

Steps: build a sparse 256 MiB disk image whose boot sector greets on the serial port; archive it the way
GCE image tarballs are made (GNU tar, old GNU sparse format); list and mount it with tarfuse; look at
it with ls, du and qemu-img; boot it in QEMU; write to it through a qcow2 overlay while the mounted
image stays unchanged; unmount. Everything happens in a temporary directory that is always removed.
"""

import contextlib
import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from kit.mounts import Mount, MountError, daemon_mount
from kit.qemu import QEMU, boot, boot_command, kvm_usable
from kit.sample import write_sparse_boot_image

IMAGE_SIZE = 256 * 1024 * 1024
MESSAGE = "Hello from a disk image inside a tar archive, served by tarfuse!"
BOOT_TIMEOUT = 60.0
TARFUSE = str(Path(sys.executable).with_name("tarfuse"))


class DemoFailed(Exception):
    """A step did not do what it should; the message says which and why."""


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def echo(command: list[str], suffix: str = "") -> None:
    shown = ["tarfuse" if word == TARFUSE else word for word in command]
    print(f"$ {shlex.join(shown)}{suffix}", flush=True)


def run(*command: str, keep: Callable[[str], bool] = lambda line: True) -> str:
    """Run a command, echo it and the output lines `keep` likes; raise DemoFailed if it fails."""
    echo(list(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    output = (result.stdout + result.stderr).rstrip()
    for line in filter(keep, output.splitlines()):
        print(f"    {line}", flush=True)
    if result.returncode != 0:
        raise DemoFailed(f"{command[0]} exited with {result.returncode}: {output}")
    return result.stdout


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as image:
        while chunk := image.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def tarfuse_mount(archive: Path, mountpoint: Path) -> Iterator[Mount]:
    """Run `tarfuse -f ARCHIVE MOUNTPOINT` in the background; always unmount and reap it."""
    command = [TARFUSE, "-f", str(archive), str(mountpoint)]
    echo(command, " &")
    try:
        with daemon_mount(command, mountpoint, mountpoint.with_name("tarfuse.log")) as mounted:
            yield mounted
    except MountError as exc:
        raise DemoFailed(f"tarfuse: {exc}") from None


def build_archive() -> Path:
    step(f"Building a sparse {IMAGE_SIZE >> 20} MiB bootable disk image (its boot sector greets on COM1)")
    write_sparse_boot_image("disk.raw", IMAGE_SIZE, MESSAGE + "\r\n")
    run("ls", "-ls", "--block-size=1", "disk.raw")
    step("Archiving it like a GCE image tarball: GNU tar, old GNU sparse format")
    run("tar", "--format=oldgnu", "-S", "-cf", "disk.tar", "disk.raw")
    run("ls", "-l", "disk.tar")
    step("What tarfuse finds in the archive")
    run(TARFUSE, "--list", "disk.tar")
    return Path("disk.tar")


def inspect_mount(image: Path, original: Path) -> None:
    step("The mounted image: full size, but only the stored data is allocated")
    run("ls", "-ls", "--block-size=1", str(image.parent))
    run("du", "-h", "--apparent-size", str(image))
    run("du", "-h", str(image))
    run("qemu-img", "info", str(image))
    step("Checking every byte against the original")
    if sha256_of(image) != sha256_of(original):
        raise DemoFailed("the mounted image differs from the original")
    print("    identical (sha256)")


def boot_in_qemu(image: Path) -> None:
    if shutil.which(QEMU) is None:
        step("Skipping the boot: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
        return
    step(f"Booting it with QEMU ({'KVM' if kvm_usable() else 'TCG'}), watching the serial console")
    echo(boot_command(image))
    booted = boot(image, MESSAGE, BOOT_TIMEOUT)
    if booted.seconds is None:
        raise DemoFailed(f"no greeting on the serial console within {BOOT_TIMEOUT:.0f} s: {booted.failure()}")
    print(f"    COM1: {MESSAGE}")
    print("    (seen; QEMU stopped)")


def overlay(image: Path) -> None:
    step("Writing through a qcow2 overlay: the mounted image stays read-only and unchanged")
    before = sha256_of(image)
    run("qemu-img", "create", "-f", "qcow2", "-b", str(image), "-F", "raw", "overlay.qcow2")
    if shutil.which("qemu-io"):
        run("qemu-io", "-c", "write -P 0xab 0 4k", "overlay.qcow2", keep=lambda x: "wrote" in x)
        run("qemu-io", "-r", "-c", "read -v 0 16", "overlay.qcow2", keep=lambda x: ":" in x)
        run("qemu-io", "-r", "-f", "raw", "-c", "read -v 0 16", str(image), keep=lambda x: ":" in x)
    else:
        run("qemu-img", "resize", "overlay.qcow2", "+1M")
    if sha256_of(image) != before:
        raise DemoFailed("the mounted image changed under the overlay")
    print(f"    {image} unchanged: sha256 {before[:16]}...")


def unmount(mountpoint: Path, daemon: subprocess.Popen[bytes]) -> None:
    step("Unmounting")
    run("fusermount3", "-u", str(mountpoint))
    if daemon.wait(10) != 0:
        raise DemoFailed(f"tarfuse exited with {daemon.returncode}")
    print("    tarfuse exited cleanly, with status 0")


def demo() -> None:
    archive = build_archive()
    mountpoint = Path("mnt")
    mountpoint.mkdir()
    step(f"Mounting {archive} on {mountpoint}/")
    with tarfuse_mount(archive, mountpoint) as mounted:
        image = mountpoint / "disk.raw"
        inspect_mount(image, Path("disk.raw"))
        boot_in_qemu(image)
        overlay(image)
        unmount(mountpoint, mounted.process)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tarfuse-demo-") as work, contextlib.chdir(work):
        print(f"Working in {work} (removed at the end)")
        try:
            demo()
        except (DemoFailed, OSError) as exc:
            print(f"\ndemo FAILED: {exc}", file=sys.stderr)
            return 1
    print("\nDone: built, archived, mounted, inspected, booted, overlaid and unmounted.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
