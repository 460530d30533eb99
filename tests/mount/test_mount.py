"""Real mounts: the tarfuse command, the kernel, and the programs that read disk images.

The oracle is always the image's own bytes (or a checksum of a file inside it), never tarfuse's parser.
"""

import contextlib
import errno
import os
import random
import re
import signal
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.ext4 import make_ext4_image, read_payload_through_loop
from kit.mounts import MountFactory, is_mounted, mount_entry, tarfuse_command, unmount
from kit.needs import make_archive, require_tool
from kit.sample import ARCHIVE_KINDS, SAMPLE_MTIME, ArchiveFactory, SampleImage, data_runs

pytestmark = pytest.mark.fuse

CHUNK_SIZE = 1024 * 1024
XATTR_PREFIX = "user.tarfuse."


def read_in_chunks(path: Path, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    with path.open("rb", buffering=0) as image:
        while chunk := image.read(chunk_size):
            yield chunk


def run_tarfuse(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tarfuse_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def list_rows(archive: Path) -> dict[str, dict[str, str]]:
    """Run `tarfuse --list` and return its table as {path: {column: value}}."""
    result = run_tarfuse("--list", archive)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    columns = header.split()
    rows = {}
    for line in lines:
        # Cells are two spaces apart or more; FORMAT ("raw (MBR boot sector)") and the sizes
        # ("4096 (4.0 KiB)") hold single spaces. Sizes keep their bytes, without the human figure.
        cells = re.split(r" {2,}", line)
        row = dict(zip(columns, cells, strict=True))
        for column in ("SIZE", "ALLOCATED"):
            row[column] = row[column].split(" (")[0]
        rows[cells[0]] = row
    return rows


@pytest.fixture
def mounted_image(sample_archive: Path, mount: MountFactory, tmp_path: Path) -> Path:
    """The sample image served from its old GNU archive, on a directory mount point."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(sample_archive, mountpoint)
    return mountpoint / "disk.raw"


# --- what is mounted -------------------------------------------------------------------------


def test_directory_mount_holds_only_the_image_named_after_the_member(
    sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(sample_archive, mountpoint)
    assert os.listdir(mountpoint) == ["disk.raw"]


def test_file_mountpoint_reads_as_the_image(
    sample_archive: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    target = tmp_path / "served.raw"
    target.write_bytes(b"covered by the mount")
    mount(sample_archive, target, "-o", "nonempty")  # a file with bytes of its own: only when asked
    assert b"".join(read_in_chunks(target)) == sample_image.data


def test_fstype_is_fuse_tarfuse_with_the_archive_as_source(sample_archive: Path, mounted_image: Path) -> None:
    entry = mount_entry(mounted_image.parent)
    assert entry is not None
    assert (entry.fstype, entry.source) == ("fuse.tarfuse", str(sample_archive.resolve()))


@pytest.fixture
def image_of_kind(kind: str, archive_of: ArchiveFactory, mount: MountFactory, tmp_path: Path) -> Path:
    """The served image of the sample archived as `kind` (the test's parameter), mounted on tmp_path."""
    mount(archive_of(kind), tmp_path)
    return tmp_path / "disk.raw"


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_whole_image_reads_back_identical(image_of_kind: Path, sample_image: SampleImage) -> None:
    offset = 0
    for chunk in read_in_chunks(image_of_kind):
        assert chunk == sample_image.data[offset : offset + len(chunk)], f"differs in {offset:#x}+"
        offset += len(chunk)
    assert offset == len(sample_image.data)


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_random_preads_match_the_image(kind: str, image_of_kind: Path, sample_image: SampleImage) -> None:
    data = sample_image.data
    rng = random.Random(kind)
    edges = [e for run in data_runs(len(data)) for e in (run.offset, run.offset + len(run.data))]
    offsets = [*(e + rng.randrange(-700, 700) for e in edges), *rng.sample(range(len(data)), 40)]
    fd = os.open(image_of_kind, os.O_RDONLY)
    try:
        for offset in [*offsets, len(data) - 100]:
            size = rng.randrange(1, 300_000)
            got = os.pread(fd, size, offset)
            assert got == data[offset : offset + size], f"pread({size}, {offset})"
    finally:
        os.close(fd)


def test_read_past_the_end_returns_nothing(mounted_image: Path, sample_image: SampleImage) -> None:
    fd = os.open(mounted_image, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, len(sample_image.data) + 10) == b""
    finally:
        os.close(fd)


def test_list_shows_what_is_mounted(sample_archive: Path, mounted_image: Path) -> None:
    rows = list_rows(sample_archive)
    assert list(rows) == ["disk.raw"]
    row = rows["disk.raw"]
    assert int(row["SIZE"]) == mounted_image.stat().st_size
    assert row["FORMAT"].split()[0] == os.getxattr(mounted_image, "user.tarfuse.format").decode()


# --- attributes ------------------------------------------------------------------------------


def test_image_mode_is_0444(mounted_image: Path) -> None:
    info = mounted_image.stat()
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o444


def test_image_size_is_the_real_size(mounted_image: Path, sample_image: SampleImage) -> None:
    assert mounted_image.stat().st_size == len(sample_image.data)


def test_image_mtime_is_the_members(mounted_image: Path) -> None:
    assert mounted_image.stat().st_mtime == SAMPLE_MTIME


def test_allocated_blocks_count_only_stored_data(
    sample_archive: Path, mounted_image: Path, sample_image: SampleImage
) -> None:
    allocated = mounted_image.stat().st_blocks * 512
    written = sum(len(run.data) for run in data_runs(len(sample_image.data))) + 512
    # Between the bytes the sample wrote and the archive that holds them (hole detection rounds
    # data runs out to file system blocks); far below the image size either way.
    assert written <= allocated <= sample_archive.stat().st_size
    listed = int(list_rows(sample_archive)["disk.raw"]["ALLOCATED"])
    assert allocated == -(-listed // 512) * 512


def test_xattrs_name_member_format_and_archive(sample_archive: Path, mounted_image: Path) -> None:
    names = {n for n in os.listxattr(mounted_image) if n.startswith(XATTR_PREFIX)}
    assert names == {f"{XATTR_PREFIX}{key}" for key in ("member", "format", "archive")}
    values = {n.removeprefix(XATTR_PREFIX): os.getxattr(mounted_image, n) for n in names}
    assert values == {
        "member": b"disk.raw",
        "format": b"raw",
        "archive": os.fsencode(sample_archive.resolve()),
    }


def test_uid_gid_umask_options_set_owner_and_mode(
    sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    mount(sample_archive, tmp_path, "-o", "uid=1234,gid=5678", "-o", "umask=0227")
    info = (tmp_path / "disk.raw").stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1234, 5678, 0o440)


def test_fsname_option_names_the_source(sample_archive: Path, mount: MountFactory, tmp_path: Path) -> None:
    mount(sample_archive, tmp_path, "-o", "fsname=vm-disk")
    entry = mount_entry(tmp_path)
    assert entry is not None
    assert (entry.fstype, entry.source) == ("fuse.tarfuse", "vm-disk")


def test_generic_mount_words_are_accepted(sample_archive: Path, mount: MountFactory, tmp_path: Path) -> None:
    words = "ro,defaults,noauto,nofail,_netdev,nosuid,nodev,noexec,user,users,x-systemd.automount"
    mount(sample_archive, tmp_path, "-o", words)
    assert os.listdir(tmp_path) == ["disk.raw"]


def test_allow_other_reaches_the_kernel(sample_archive: Path, mount: MountFactory, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("allow_other needs root or user_allow_other in /etc/fuse.conf")
    mount(sample_archive, tmp_path, "-o", "allow_other")
    entry = mount_entry(tmp_path)
    assert entry is not None
    assert "allow_other" in entry.super_options


# --- read-only -------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_open_for_writing_fails_with_erofs(mounted_image: Path, flags: int) -> None:
    with pytest.raises(OSError, match="Read-only") as caught:
        os.close(os.open(mounted_image, flags))
    assert caught.value.errno == errno.EROFS


def test_truncate_fails_with_erofs(mounted_image: Path) -> None:
    with pytest.raises(OSError, match="Read-only") as caught:
        os.truncate(mounted_image, 0)
    assert caught.value.errno == errno.EROFS


def test_chmod_fails_with_erofs(mounted_image: Path) -> None:
    with pytest.raises(OSError, match="Read-only") as caught:
        os.chmod(mounted_image, 0o644)
    assert caught.value.errno == errno.EROFS


def test_creating_a_file_fails_with_erofs(mounted_image: Path) -> None:
    with pytest.raises(OSError, match="Read-only") as caught:
        (mounted_image.parent / "new").write_bytes(b"x")
    assert caught.value.errno == errno.EROFS


def test_setxattr_fails_with_erofs(mounted_image: Path) -> None:
    with pytest.raises(OSError, match="Read-only") as caught:
        os.setxattr(mounted_image, "user.tarfuse.member", b"other")
    assert caught.value.errno == errno.EROFS


# --- block devices and QEMU's tools ----------------------------------------------------------


def test_ext4_inside_mounts_through_a_read_only_loop_device(mount: MountFactory, tmp_path: Path) -> None:
    content = random.Random(4).randbytes(300_000)
    image = make_ext4_image(tmp_path / "ext4.img", content)
    (served := tmp_path / "mnt").mkdir()
    mount(make_archive("gnu", image, tmp_path / "fs.tar"), served)
    assert read_payload_through_loop(served / "ext4.img", tmp_path / "inner") == content


def test_qemu_img_compare_finds_qcow2_in_tar_equal_to_its_raw_original(
    sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    require_tool("qemu-img")
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(sample_image.path), str(qcow2)],
        check=True,
    )
    archive = make_archive("gnu", qcow2, tmp_path / "qcow2.tar")
    (served := tmp_path / "mnt").mkdir()
    mount(archive, served)
    qcow2_served, raw_original = str(served / "disk.qcow2"), str(sample_image.path)
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow2_served, raw_original],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def ova(sample_image: SampleImage, tmp_path: Path) -> Path:
    """An OVA as VMware and VirtualBox export them: a tar of an OVF descriptor, then the VMDK."""
    require_tool("qemu-img")
    (parts := tmp_path / "parts").mkdir()
    vmdk = parts / "disk.vmdk"
    options = ["-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"]
    subprocess.run(
        ["qemu-img", "convert", *options, str(sample_image.path), str(vmdk)],
        check=True,
    )
    (parts / "vm.ovf").write_text(
        '<?xml version="1.0"?>\n<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">\n'
        '  <References><File ovf:id="file1" ovf:href="disk.vmdk"/></References>\n</Envelope>\n'
    )
    archive = tmp_path / "vm.ova"
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("vm.ovf", "disk.vmdk"):
            tar.add(parts / name, arcname=name)
    return archive


def test_qemu_img_info_reads_the_vmdk_inside_an_ova(
    ova: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    (served := tmp_path / "mnt").mkdir()
    mount(ova, served)
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", str(served / "disk.vmdk")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"format": "vmdk"' in result.stdout
    assert f'"virtual-size": {len(sample_image.data)}' in result.stdout


def test_member_option_serves_the_named_file(ova: Path, mount: MountFactory, tmp_path: Path) -> None:
    (served := tmp_path / "mnt").mkdir()
    mount(ova, served, "-o", "member=vm.ovf")
    with tarfile.open(ova) as tar:
        descriptor = tar.extractfile("vm.ovf")
        assert descriptor is not None
        expected = descriptor.read()
    assert (served / "vm.ovf").read_bytes() == expected


@pytest.fixture
def tarfuse_on_mount_path() -> Iterator[None]:
    """Make `tarfuse` findable by mount.fuse3 (its PATH has /usr/local/bin) for one test."""
    if os.getuid() != 0:
        pytest.skip("mount -t fuse.tarfuse needs root")
    require_tool("mount.fuse3")
    link = Path("/usr/local/bin/tarfuse")
    if link.exists() or link.is_symlink():
        yield
        return
    link.symlink_to(Path(tarfuse_command()[0]).with_name("tarfuse"))
    try:
        yield
    finally:
        link.unlink()


@pytest.mark.usefixtures("tarfuse_on_mount_path")
def test_mount_command_mounts_type_fuse_tarfuse(
    sample_archive: Path, sample_image: SampleImage, tmp_path: Path
) -> None:
    command = ["mount", "-t", "fuse.tarfuse", str(sample_archive), str(tmp_path)]
    try:
        subprocess.run([*command, "-o", "ro,member=disk.raw"], check=True, timeout=30)
        entry = mount_entry(tmp_path)
        assert entry is not None
        assert (entry.fstype, entry.source) == ("fuse.tarfuse", str(sample_archive.resolve()))
        assert (tmp_path / "disk.raw").read_bytes()[:CHUNK_SIZE] == sample_image.data[:CHUNK_SIZE]
    finally:
        unmount(tmp_path)


# --- lifecycle -------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signal_the_moment_the_mount_appears_unmounts_and_exits_zero(
    signum: signal.Signals, sample_archive: Path, tmp_path: Path
) -> None:
    # Between mount(2) and the loop's signal handler, a stop signal used to kill the daemon by default
    # and leave the mount dead ("Transport endpoint is not connected"); it is held back until then now.
    for attempt in range(6):
        mountpoint = tmp_path / str(attempt)
        mountpoint.mkdir()
        process = subprocess.Popen(
            tarfuse_command("-f", sample_archive, mountpoint),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 10
            while not is_mounted(mountpoint) and process.poll() is None and time.monotonic() < deadline:
                pass  # no sleep: the signal must come the moment the mount is there
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=10)
            assert process.returncode == 0, (attempt, stderr.decode(errors="replace"))
            assert not is_mounted(mountpoint)
        finally:
            process.kill()
            unmount(mountpoint)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signal_unmounts_and_exits_zero(
    signum: signal.Signals, sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    served = mount(sample_archive, tmp_path)
    served.process.send_signal(signum)
    assert served.process.wait(10) == 0, served.stderr_text()
    assert not is_mounted(tmp_path)


def test_fusermount_unmount_makes_the_daemon_exit_zero(
    sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    served = mount(sample_archive, tmp_path)
    subprocess.run(["fusermount3", "-u", str(tmp_path)], check=True)
    assert served.process.wait(10) == 0, served.stderr_text()


@pytest.mark.parametrize("mode", [["-f"], []], ids=["foreground", "background"])
def test_bad_archive_fails_with_one_line_and_mounts_nothing(mode: list[str], tmp_path: Path) -> None:
    archive = tmp_path / "random.tar"
    archive.write_bytes(random.Random(0).randbytes(64 * 1024))
    (mountpoint := tmp_path / "mnt").mkdir()
    try:
        result = run_tarfuse(*mode, archive, mountpoint)
        mounted = is_mounted(mountpoint)
    finally:
        unmount(mountpoint)
    assert result.returncode != 0
    assert result.stderr.startswith("tarfuse: ")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not mounted


def test_unsupported_compression_is_refused_with_how_to_decompress(
    sample_archive: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "img.tar.lz4"  # gzip, zstd, xz and bzip2 mount: sources/test_compressed_mount.py
    archive.write_bytes(b"\x04\x22\x4d\x18" + sample_archive.read_bytes())
    (mountpoint := tmp_path / "mnt").mkdir()
    try:
        result = run_tarfuse("-f", archive, mountpoint)
        mounted = is_mounted(mountpoint)
    finally:
        unmount(mountpoint)
    assert (result.returncode, mounted) == (1, False)
    assert "unlz4" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_second_mount_on_a_busy_mountpoint_is_refused(
    sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    mount(sample_archive, tmp_path)
    result = run_tarfuse("-f", sample_archive, tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("tarfuse: ")
    assert str(tmp_path) in result.stderr


def test_first_mount_keeps_serving_after_a_refused_second_one(
    sample_archive: Path, sample_image: SampleImage, mount: MountFactory, tmp_path: Path
) -> None:
    mount(sample_archive, tmp_path)
    run_tarfuse("-f", sample_archive, tmp_path)
    assert (tmp_path / "disk.raw").read_bytes()[:CHUNK_SIZE] == sample_image.data[:CHUNK_SIZE]


@pytest.mark.parametrize(("option", "named"), [("rw", "'rw'"), ("ro,frobnicate=1", "'frobnicate=1'")])
def test_bad_option_is_refused_by_name(option: str, named: str, sample_archive: Path, tmp_path: Path) -> None:
    try:
        result = run_tarfuse("-f", sample_archive, tmp_path, "-o", option)
        mounted = is_mounted(tmp_path)
    finally:
        unmount(tmp_path)
    assert (result.returncode, mounted) == (2, False)
    assert result.stderr.startswith("tarfuse: ")
    assert named in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def daemon_pids(mountpoint: Path) -> list[int]:
    """Processes whose command line names `mountpoint`: the detached daemon, if it still runs."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # split on spaces too: with several workers, setproctitle joins the words into one
                arguments = (entry / "cmdline").read_bytes().replace(b"\0", b" ").split(b" ")
                if os.fsencode(mountpoint) in arguments:
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def background_mount(archive: Path, mountpoint: Path) -> Iterator[subprocess.CompletedProcess[str]]:
    """Run `tarfuse ARCHIVE MOUNTPOINT` (detaching); unmount and reap the daemon afterwards."""
    try:
        yield run_tarfuse(archive, mountpoint)
    finally:
        unmount(mountpoint)
        for pid in daemon_pids(mountpoint):  # an unmounted daemon should be gone; make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_background_mount_is_live_when_the_command_returns(sample_archive: Path, tmp_path: Path) -> None:
    with background_mount(sample_archive, tmp_path) as result:
        assert result.returncode == 0, result.stderr
        assert is_mounted(tmp_path)
        assert os.listdir(tmp_path) == ["disk.raw"]


def test_background_daemon_exits_after_unmount(sample_archive: Path, tmp_path: Path) -> None:
    with background_mount(sample_archive, tmp_path) as result:
        assert result.returncode == 0, result.stderr
        assert daemon_pids(tmp_path)
        subprocess.run(["fusermount3", "-u", str(tmp_path)], check=True)
        deadline = time.monotonic() + 10
        while daemon_pids(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not daemon_pids(tmp_path)


@pytest.mark.fuse
def test_readahead_is_raised_before_the_first_request_after_init(
    sample_archive: Path, mount: MountFactory, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root may set a mount's read_ahead_kb")
    (mnt := tmp_path / "mnt").mkdir()
    mount(sample_archive, mnt)
    major_minor = os.stat(mnt).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(major_minor)}:{os.minor(major_minor)}/read_ahead_kb")
    assert knob.read_text().strip() == "4096"  # a file opened with the kernel's 128 KiB default keeps it
