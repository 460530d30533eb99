"""The `tarfuse` command: arguments and -o options, logging, and exit codes.

`mount.fuse3` (fstab, systemd .mount units) runs helpers as `TYPE SOURCE MOUNTPOINT -o OPTIONS`, so that is
the shape of the command line, as for sshfs. Exit codes: 0 success, 1 the archive or the mount failed,
2 the command line is wrong.
"""

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys
import textwrap
from typing import TYPE_CHECKING

from tarfuse import __version__, report
from tarfuse.errors import ArchiveError, TarfuseError, UsageError
from tarfuse.helptext import DESCRIPTION, EXIT_STATUS, FSTAB_EXAMPLE, GENERIC_WORDS, MOUNT_OPTION_HELP
from tarfuse.mount import Assembly, assemble, list_archive
from tarfuse.options import (
    MountOptions,
    split_mount_options,
)
from tarfuse.printable import PrintableFormatter, printable, terminal_safe
from tarfuse.serve import daemon, direct
from tarfuse.serve.fs import STATUS_XATTR, ImageFs, seek_support
from tarfuse.sources.locations import display_name, is_url

if TYPE_CHECKING:
    pass

log = logging.getLogger("tarfuse")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FUSE_CONF = "/etc/fuse.conf"  # fusermount3 reads user_allow_other from here


def parser() -> argparse.ArgumentParser:
    """The command line, for main() and for the man page (manpage.py)."""
    command = argparse.ArgumentParser(
        prog="tarfuse",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(DESCRIPTION, 78),
        epilog="mount options (-o):\n"
        + "".join(
            f"  {words}\n{textwrap.fill(meaning, 78, initial_indent=' ' * 6, subsequent_indent=' ' * 6)}\n"
            for words, meaning in MOUNT_OPTION_HELP
        )
        + f"\n{textwrap.fill(GENERIC_WORDS, 78)}\n\nfstab: {FSTAB_EXAMPLE}\n{EXIT_STATUS.lower()}",
    )
    command.add_argument(
        "archive",
        metavar="ARCHIVE",
        nargs="?",  # required, but for --cache (main says so)
        help="a tar, a compressed tar (.tar.gz/.zst/.xz/.bz2), an OVA, a bare or compressed image (.img.xz), "
        "as a path, an http(s) URL, or an object in S3, GCS or Azure (s3://BUCKET/KEY, gs://BUCKET/KEY, "
        "az://CONTAINER/KEY)",
    )
    command.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        nargs="?",
        help="a directory (the image appears inside it) or a file (it becomes the image)",
    )
    command.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options (below)",
    )
    command.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (systemd Type=simple services, debugging); otherwise return once the "
        "mount is live, the daemon logging to syslog or the journal",
    )
    command.add_argument("-d", "--debug", action="store_true", help="log debug messages")
    command.add_argument("--debug-fuse", action="store_true", help="also log libfuse's requests")
    command.add_argument("-l", "--list", action="store_true", help="list the disk images in ARCHIVE and exit")
    command.add_argument(
        "--json", action="store_true", help="with --list, --status or --cache: one JSON object, for scripts"
    )
    command.add_argument(
        "--status",
        action="store_true",
        help="tarfuse --status MOUNTPOINT: what the mount serves, how far its background pass is "
        "(percent, rate, time left), where its index and spill are and their size, and for a URL the "
        "bytes fetched so far; for the user who mounted it, and root; then exit",
    )
    command.add_argument(
        "--index-only",
        action="store_true",
        help="tarfuse --index-only ARCHIVE -o index=PATH: decompress a compressed ARCHIVE once and write "
        "its seek index to PATH, to publish beside the object as ARCHIVE.tarfuse-index (docs/remote.md): "
        "every host that mounts it then starts at once, with no pass; then exit",
    )
    command.add_argument(
        "--cache",
        action="store_true",
        help="list what tarfuse keeps in the caller's cache directory (the index and spill of URLs, of "
        "archives in read-only or shared directories, of compressed members): the archive each entry "
        "belongs to, its size, last use, and whether a mount uses it; then exit",
    )
    command.add_argument(
        "--prune",
        action="store_true",
        help="with --cache: remove every entry that no running mount uses, and say what was freed",
    )
    command.add_argument(
        "-V", "--version", action="version", version=f"tarfuse {__version__} ({seek_support()})"
    )
    return command


def main(argv: list[str] | None = None) -> int:
    command = parser()
    args = command.parse_intermixed_args(argv)  # options anywhere, as mount helpers take them
    if args.archive is None and not (args.cache or args.prune):
        command.error(f"the following arguments are required: {'MOUNTPOINT' if args.status else 'ARCHIVE'}")
    if argv is None:
        _hide_secrets(sys.argv[1:])
    console = logging.StreamHandler()
    console.setFormatter(
        PrintableFormatter("tarfuse: %(message)s" if not args.debug else "tarfuse: %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[console])
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    try:
        options = split_mount_options(args.options, rw_is_default=_run_by_mount())
        if args.json and not (args.list or args.cache or args.status):
            raise UsageError("--json goes with --list, --status or --cache")
        if args.cache or args.prune:
            return _cache(args)
        if args.status:
            return _status(args)
        if args.list and args.mountpoint is not None:
            shown = printable(args.mountpoint)
            raise UsageError(f"--list takes no MOUNTPOINT ({shown}): it only lists ARCHIVE")
        if args.index_only:
            return _index_only(args, options)
        if args.list:
            return _list(args.archive, options, args.json)
        if args.mountpoint is None:
            raise UsageError("MOUNTPOINT is missing (or use --list to see what ARCHIVE holds)")
        return _mount(args, options)
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        _error(f"interrupted by {name}" + ("" if args.list else "; nothing mounted"))
        return 128 + exc.signum
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except TarfuseError as exc:
        _error(f"{_shown_path(args.archive)}: {exc}")
        return EXIT_FAILED
    except OSError as exc:
        named = isinstance(exc.filename, str | bytes) and exc.filename
        _error(f"{printable(exc.filename) if named else _shown_path(args.archive)}: {exc.strerror}")
        return EXIT_FAILED


# Until the mount is live, a stop signal ends tarfuse with one line; from then on the daemon's loop takes
# them (daemon.mount holds them back until it listens), and they unmount.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal before the mount was live. A BaseException, as KeyboardInterrupt is: no handler that
    turns failures into EIO or a log line may take it; cleanup (`finally`, `with`) runs on its way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _error(message: str) -> None:
    """One line on stderr; whatever names it carries cannot act on the terminal (printable.py)."""
    print(f"tarfuse: {terminal_safe(message)}", file=sys.stderr)


def _shown_path(path: str) -> str:
    """The archive as messages name it: no URL secrets, no raw control characters."""
    return printable(display_name(path))


_HEADER_VALUE = re.compile(r"(header=[^:,]*:)[^,]*")


def _hide_secrets(words: list[str]) -> None:
    """Give `ps` a command line without a URL's query string or user info, or -o header= values.

    /proc/PID/cmdline is readable by every user; setproctitle rewrites it in place. What it showed for the
    fraction of a second before this runs cannot be taken back.
    """
    if _shown_command(words) != " ".join(["tarfuse", *words]):
        import setproctitle

        setproctitle.setproctitle(_shown_command(words))


def _log_debug(message: str | None) -> None:
    if message is not None:
        log.debug("%s", message)


def _shown_command(words: list[str]) -> str:
    """The command line as ps may show it: no URL query string or user info, no -o header= value."""
    shown = [display_name(w) if is_url(w) else _HEADER_VALUE.sub(r"\1***", w) for w in words]
    return " ".join(["tarfuse", *shown])


def _run_by_mount() -> bool:
    """Whether mount(8) started us through mount.fuse3 (fstab, systemd .mount units)."""
    pid = os.getppid()
    for _ in range(3):  # mount -> mount.fuse3 (which execs sh -c) -> tarfuse
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat_file:
                name, _, rest = stat_file.read().partition("(")[2].rpartition(")")
        except OSError:
            return False
        if name in ("mount", "mount.fuse3", "mount.fuse"):
            return True
        pid = int(rest.split()[1])
    return False


def _list(path: str, options: MountOptions, as_json: bool = False) -> int:
    listing = list_archive(path, options, say=log.info)
    compression, found, images = listing.compression, listing.index, listing.images
    if as_json:
        report.print_json(report.listing_json(path, compression, found, images))
    elif compression is not None:
        print(f"{_shown_path(path)}: {compression}-compressed, index: {printable(found or 'none')}")
    if not images:
        _error(f"{_shown_path(path)}: no disk image found")
        return EXIT_FAILED
    for warning in (warning for image in images for warning in image.member.warnings):
        _error(f"{_shown_path(path)}: warning: {warning}")
    if not as_json:
        report.print_table(images)
    return EXIT_OK


def _index_only(args: argparse.Namespace, options: MountOptions) -> int:
    """`tarfuse --index-only ARCHIVE -o index=PATH`: the index to publish beside the object."""
    from tarfuse.publish import make_index  # only --index-only needs it

    if args.mountpoint is not None or args.list:
        extra = printable(args.mountpoint) if args.mountpoint is not None else "--list"
        raise UsageError(f"--index-only takes ARCHIVE and -o index=PATH, nothing else ({extra})")
    on_terminal = sys.stderr.isatty()

    def progress(line: str) -> None:
        if on_terminal:
            print(f"\r\033[Ktarfuse: {terminal_safe(line)}", end="", file=sys.stderr, flush=True)

    where, length = make_index(args.archive, options, progress)
    if on_terminal:
        print("\r\033[K", end="", file=sys.stderr)
    name = _beside_name(args.archive, ".tarfuse-index")
    print(f"wrote {printable(where)} ({length} bytes): publish it beside the archive, as {name}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    """`tarfuse --status MOUNTPOINT [--json]`: asked of the daemon through its root's STATUS_XATTR."""
    import json  # only --status needs it: a mount does not pay its import

    if args.mountpoint is not None or args.list:
        extra = printable(args.mountpoint) if args.mountpoint is not None else "--list"
        raise UsageError(f"--status takes one MOUNTPOINT and nothing else ({extra})")
    mountpoint = args.archive  # the one word given
    shown = printable(mountpoint)
    try:
        raw = os.getxattr(mountpoint, os.fsdecode(STATUS_XATTR))
    except OSError as exc:
        _error(f"{shown}: {_status_failure(exc)}")
        return EXIT_FAILED
    try:
        status = json.loads(raw)
    except ValueError:
        _error(f"{shown}: its status is not what tarfuse --status reads (another tarfuse version?)")
        return EXIT_FAILED
    if args.json:
        report.print_json(status)
    else:
        report.print_status(mountpoint, status)
    return EXIT_OK


def _status_failure(exc: OSError) -> str:
    """Why a mount's status could not be read, with what to do."""
    if exc.errno in (errno.ENODATA, errno.ENOTSUP):
        return "not a tarfuse mount point (or one mounted by a tarfuse without --status)"
    if exc.errno == errno.EACCES:
        return "only the user who mounted it, and root, may ask for its status"
    if exc.errno == errno.ENOTCONN:
        return "its daemon is gone (unmount it: fusermount3 -u MOUNTPOINT)"
    return exc.strerror or str(exc)


def _cache(args: argparse.Namespace) -> int:
    """`tarfuse --cache [--prune] [--json]`: what the cache directory keeps, and removing what is unused."""
    from tarfuse.sources import cachedir  # only --cache needs it: a mount does not pay its import

    if not args.cache:
        raise UsageError("--prune goes with --cache")
    given = [word for word in (args.archive, args.mountpoint) if word is not None]
    if given or args.list:
        shown = " ".join(printable(word) for word in given) or "--list"
        raise UsageError(
            f"--cache takes no ARCHIVE, MOUNTPOINT or --list ({shown}): it looks at the cache only"
        )
    directory, why = cachedir.existing_cache_dir()
    if directory is None:
        if args.json:
            report.print_json({"directory": None, "why": why, "entries": [], "size": 0})
        else:
            print(printable(why))
        return EXIT_OK
    try:
        if args.prune:
            report.show_pruned(directory, cachedir.prune(directory), args.json)
        else:
            report.show_cache(directory, cachedir.kept(directory), args.json)
    except OSError as exc:
        _error(f"cache directory {printable(directory)}: {exc.strerror or exc}")
        return EXIT_FAILED
    return EXIT_OK


def _mount(args: argparse.Namespace, options: MountOptions) -> int:
    mountpoint = daemon.pin_mountpoint(args.mountpoint)  # now: once mounted, resolving it would hang
    if mountpoint.is_file:
        _refuse_to_hide(mountpoint, args.archive, options)
    several = not mountpoint.is_file  # a directory mount point serves every disk of a multi-disk archive
    assembly = assemble(args.archive, options, several=several, say=log.info)
    for note in assembly.notes:
        log.info("%s", note)
    for image in assembly.images:
        for warning in image.member.warnings:  # metadata tar -x would also have taken leniently
            log.warning("%s: warning: %s", _shown_path(args.archive), warning)
        log.debug("serving %s (%s, %d bytes)", printable(image.name), image.format, image.mapper.size)
    ops = ImageFs(
        assembly.served,
        mountpoint.is_file,
        after_init=lambda: daemon.tune_readahead(mountpoint.path, options.readahead_kb),
        symlinks=assembly.symlinks,
        status=lambda: _status_bytes(assembly, args.archive),
    )
    fuse_options = set(options.fuse) | {
        "ro",
        "default_permissions",
        "subtype=tarfuse",
        "fsname=" + fuse_option_value(options.fsname or display_name(args.archive)),
    }
    if args.debug_fuse:
        fuse_options.add("debug")
    processes = assembly.processes(options.workers)
    if options.workers is not None and options.workers > processes:
        log.info("workers=%d: a compressed or http(s) archive is served by one process", options.workers)
    if not args.foreground:
        assembly.before_fork()
    serving: list[int] = []  # the processes that served (after any fork): they write what they recorded

    def before_serving() -> None:
        serving.append(os.getpid())
        _log_debug(assembly.before_serving())
        if handed := ops.serve_directly():
            log.debug("%d file(s) served by pyfuse3's C read path in process %d", handed, os.getpid())

    try:
        daemon.mount(ops, mountpoint, fuse_options)
    except daemon.MountFailed:
        assembly.close()
        raise ArchiveError(f"could not mount on {args.mountpoint} ({_mount_failure_hint(options)})") from None
    try:
        plan = daemon.Plan(
            mountpoint.path,
            foreground=args.foreground,
            tasks=assembly.tasks,
            processes=processes,
            background=assembly.background,
            before_wait=ops.after_init_replied,
            init_replied=ops.init_replied,
            before_serving=before_serving,
            title=_shown_command(sys.argv[1:]),
        )
        return daemon.serve(plan)
    finally:
        if os.getpid() in serving and options.http.record_reads is not None:
            _save_read_list(options.http.record_reads, assembly.archive.recorded_reads(), args.archive)
        assembly.close()


def _save_read_list(path: str, data: bytes | None, archive: str) -> None:
    """-o record_reads=PATH: the blocks this mount read, first read first, to publish beside the object."""
    from tarfuse.sources import sidefiles

    if data is None:
        return
    try:
        sidefiles.write_file(path, data)
    except OSError as exc:
        log.error("could not write the read list to %s: %s", printable(path), exc.strerror or exc)
        return
    name = _beside_name(archive, ".tarfuse-reads")
    log.info("read list written to %s: publish it beside the archive, as %s", printable(path), name)


def _beside_name(archive: str, suffix: str) -> str:
    """The name a side file of ARCHIVE is published under beside it: its last name, with `suffix`."""
    return printable(display_name(archive).rpartition("/")[2] + suffix)


def _status_bytes(assembly: Assembly, archive: str) -> bytes:
    import json

    status = assembly.status(display_name(archive))
    if (counts := direct.counts()) is not None:  # of the process that answers (one of the workers)
        status["direct_reads"] = counts
    return json.dumps(status).encode()


def _refuse_to_hide(mountpoint: daemon.MountPoint, archive: str, options: MountOptions) -> None:
    """A file mount point hides the file while mounted: never the archive itself (`tarfuse vm.tar vm.tar`),
    and a file with bytes of its own (`tarfuse vm.tar disk.img.gz`) only when -o nonempty says so."""
    info = os.fstat(mountpoint.fd)
    shown = printable(mountpoint.path)
    if not is_url(archive):
        with contextlib.suppress(OSError):  # a missing archive is said when it is opened
            served = os.stat(archive)
            if (served.st_dev, served.st_ino) == (info.st_dev, info.st_ino):
                raise UsageError(
                    f"mount point {shown} is the archive itself: mount it on another file or a directory"
                )
    if info.st_size and not options.nonempty:
        raise UsageError(
            f"mount point {shown} is a file of {info.st_size} bytes, which the mount would hide: "
            "mount on an empty file or a directory, or add -o nonempty"
        )


def fuse_option_value(value: str) -> str:
    """Escape a value for one libfuse -o word: a ',' would end it and start another option.

    An archive named `vm.tar,allow_other` must not mount with allow_other. libfuse's option parser
    (fuse_opt.c, process_real_option_group) reads `\\NNN` as an octal byte; pyfuse3 passes each option as
    ASCII, so every byte that is not printable ASCII, and ',' and '\\' themselves, is written that way.
    """
    return "".join(
        chr(b) if 0x20 < b < 0x7F and b not in b",\\" else f"\\{b:03o}" for b in os.fsencode(value)
    )


def _mount_failure_hint(options: MountOptions) -> str:
    """Say what to do after libfuse refused the mount; for the one cause we can check, say it exactly."""
    if "allow_other" in options.fuse and os.getuid() != 0 and not _user_allow_other():
        return (
            f"-o allow_other needs a line 'user_allow_other' in {FUSE_CONF}, which root must add; "
            "or mount without allow_other"
        )
    return "see the message above"


def _user_allow_other() -> bool:
    """Whether /etc/fuse.conf lets users mount with allow_other (a line of its own, as fusermount3 wants)."""
    try:
        with open(FUSE_CONF, encoding="utf-8", errors="replace") as conf:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in conf)
    except OSError:
        return False
