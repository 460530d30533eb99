"""The words of `tarfuse --help`, the man page and the README's option table, written once.

The -o options are one list (MOUNT_OPTION_HELP): --help, the man page (manpage.py) and the README's table
are all made from it (tests/test_docs.py checks the README against it).
"""

from tarfuse.options import CPUS_PER_WORKER, DEFAULT_MAX_RATIO, DEFAULT_WORKERS_MAX

DESCRIPTION = (
    "Mount the disk image inside an archive as one read-only file, without unpacking it. ARCHIVE is a "
    "path or an http:// or https:// URL (read with HTTP range requests) of a tar archive (sparse members, "
    "GNU tar -S in every format, are served with their holes as zeros), a compressed tar (.tar.gz, "
    ".tar.zst, .tar.xz, .tar.bz2), an OVA, a bare disk image, or a bare compressed image (.img.xz, "
    ".img.gz, .img.zst, .img.bz2). MOUNTPOINT is a directory (the image appears inside it at its path) or "
    "a file (it becomes the image). Unmount with: fusermount3 -u MOUNTPOINT"
)
GENERIC_WORDS = (
    "The generic words that mount, fstab and systemd pass (ro, defaults, noauto, nofail, _netdev, user, "
    "users, nosuid, nodev, noexec, x-systemd.*, ...) are accepted. The mount is always read-only: -o rw "
    "on the tarfuse command line is refused; the rw that mount(8) adds by itself is accepted. An unknown "
    "option is an error that names it."
)
FSTAB_EXAMPLE = "/srv/vm.tar /mnt/vm fuse.tarfuse ro,allow_other,member=disk.raw,nofail 0 0"
EXIT_STATUS = (
    "Exit status: 0 success, 1 the archive or the mount failed, 2 usage error, "
    "128+N a signal N (Ctrl-C: 130) before the mount was live: nothing mounted."
)
# The -o options, for people: --help, the man page (tarfuse/manpage.py) and the README's table are all
# made from this one list (tests/test_docs.py checks the README against it).
MOUNT_OPTION_HELP = (
    (
        "member=PATH",
        "serve this one image (--list shows them); without it, a directory mount point serves every disk "
        "image of the archive at its path, a file mount point needs the archive to hold one",
    ),
    (
        "all",
        "also serve every other regular file of the archive at its path (an OVA's .ovf and .mf, a "
        "Vagrantfile), read-only; hard links as the file they name; a compressed archive is read whole first",
    ),
    (
        "nonempty",
        "mount on a MOUNTPOINT file that is not empty (its bytes are hidden while mounted); without it, "
        "tarfuse refuses, and it never mounts over the archive itself",
    ),
    (
        "allow_other",
        "let other users (e.g. a QEMU running as libvirt-qemu) read the image; for non-root users it "
        "needs a line user_allow_other in /etc/fuse.conf",
    ),
    ("uid=N,gid=N,umask=OCTAL", "owner and mode of the served file (default: the mounting user, mode 0444)"),
    (
        "fsname=NAME",
        "what mount and findmnt show as the source (default: the archive's path; for a URL, the URL "
        "without its query string)",
    ),
    ("readahead_kb=N", "the mount's readahead, for root (default 4096: 1 MiB requests, several in flight)"),
    (
        "workers=N",
        "processes that serve a plain or sparse local archive (default: one per "
        f"{CPUS_PER_WORKER} CPUs, 1 to {DEFAULT_WORKERS_MAX}; 1 on 2 CPUs, where 2 were slower); a "
        "compressed or http(s) archive is always served by one",
    ),
    (
        "index=PATH",
        "where a compressed archive's seek index is kept (default: beside the archive if only root or "
        "the caller can change that directory, else the caller's cache directory; docs/compressed.md)",
    ),
    (
        "noindex",
        "keep no index on disk: every mount of a compressed archive indexes it again (a spill, if one is "
        "made, is an unnamed temporary file, gone at unmount)",
    ),
    (
        "cache_size=SIZE",
        "memory for decompressed chunks of a compressed archive, and the block cache of an http(s) "
        "archive (default 64M)",
    ),
    (
        "decoder_memory=SIZE",
        "memory for the windows and dictionaries of a compressed archive's decoders, half each for the "
        "background pass and for reads (default 144M: xz -9, zstd up to level 19); a stream that needs "
        "more (zstd --long, a huge xz dictionary) is refused with a line that says so (docs/compressed.md)",
    ),
    (
        "spill_max=SIZE",
        "the longest spill of a one-frame zstd or one-block xz archive (default: 16 times the compressed "
        "archive, at least 256M); past it, or where it would leave less than a tenth of its file system "
        "free (at most 1G), no spill is kept and backwards reads decompress from the start",
    ),
    (
        "cache_max=SIZE",
        "what the cache directory may hold (default 16G): at mount, entries of archives that are gone or "
        "changed are removed, then the least recently used past SIZE; those of running mounts stay",
    ),
    (
        "max_ratio=N",
        "a compressed image that says its size only at its end (.img.gz, .img.bz2) is decompressed once "
        f"before the mount; past N times its compressed size (default {DEFAULT_MAX_RATIO}, never below "
        "256 MiB) it is refused as a decompression bomb; 0: no bound (docs/compressed.md)",
    ),
    (
        "header=NAME:VALUE",
        "http(s) archives: a request header, e.g. Authorization:Bearer TOKEN (repeatable; no commas in "
        "the value); never logged, never sent to another host",
    ),
    (
        "ca_file=PEM,timeout=SECONDS,retries=N",
        "http(s) archives: CA bundle (default: the system's), connect and read timeout (20; a whole "
        "request, body included, must end within twice that), failed tries in a row before a read fails "
        "with EIO (5); HTTPS_PROXY, HTTP_PROXY and NO_PROXY are honoured (docs/remote.md)",
    ),
    (
        "endpoint=URL",
        "s3://, gs://, az:// archives: the store's endpoint, for an S3-compatible server or an emulator "
        "(an http:// one is used as given; default: the cloud's, or AWS_ENDPOINT_URL); credentials come "
        "from each cloud's standard chain: environment, web identity, instance metadata, GOOGLE_APPLICATION_"
        "CREDENTIALS, Azure managed identity, AWS_PROFILE with boto3 (docs/remote.md)",
    ),
    (
        "region=NAME,anonymous",
        "s3:// archives: the bucket's region (default: AWS_REGION, else us-east-1); s3://, gs://, az://: "
        "a public object, read without credentials or a signature",
    ),
    (
        "record_reads=PATH",
        "remote archives: write the blocks this mount's readers asked for, in order, to PATH at unmount "
        "(mount, boot the guest, unmount); published beside an object as OBJECT.tarfuse-reads, it is "
        "fetched ahead by every later cold mount of that object (docs/remote.md)",
    ),
    (
        "follow_redirects",
        "http(s) archives: follow a redirect to another host (another scheme, host or port), without the "
        "header= values; without it such a redirect is refused; https to http is always refused",
    ),
)
