"""The -o options, parsed once, where the command line is read, into the typed settings each part uses.

mount(8), fstab and systemd hand a helper one comma-separated list of words: ours (member=, cache_size=,
...), the http(s) archives' (http/options.py), the generic ones libfuse understands (passed on), and the
ones that mean nothing here (accepted). An unknown word is an error that names it.
"""

import re
from dataclasses import dataclass, field

from tarfuse.errors import UsageError
from tarfuse.sources import DEFAULT_CACHE_MAX, DEFAULT_CACHE_SIZE
from tarfuse.sources.compression import DEFAULT_DECODER_MEMORY
from tarfuse.sources.http import options as http_options
from tarfuse.sources.http.options import NO_HTTP_OPTIONS, RemoteOptions

# -o max_ratio: a stream decompressed for its size before the mount is refused past this many times its
# compressed size (and passes.RATIO_FLOOR). gzip cannot pass ~1,030; images with data stay far below; a
# blank file system compressed by bzip2 or zstd goes beyond (docs/compressed.md).
DEFAULT_MAX_RATIO = 10_000
MAX_WORKERS = 64  # -o workers=: more processes than this is a typo, not a plan
# The default -o workers: one process per CPUS_PER_WORKER CPUs this process may run on, at least one and at
# most DEFAULT_WORKERS_MAX. A request costs the server about as much CPU as it costs the reader's side,
# so a worker is kept busy by about one CPU of readers, and the VM being served needs CPUs of its own.
# On 2 vCPUs, where this gives 1, two processes served 4 readers slower than one (more context switches
# per request, and nothing idle to run them on). On bigger hosts the formula is a paper estimate. Figures:
# docs/benchmarks.md, "Serving from several processes".
CPUS_PER_WORKER = 4
DEFAULT_WORKERS_MAX = 8


@dataclass
class MountOptions:
    """The -o options, split into ours and the ones handed to libfuse."""

    member: str | None = None
    uid: int | None = None
    gid: int | None = None
    umask: int = 0o222
    fsname: str | None = None
    readahead_kb: int = 4096  # measured: 1 MiB requests, several in flight (docs/benchmarks.md)
    cache_size: int = DEFAULT_CACHE_SIZE
    fuse: set[str] = field(default_factory=set)
    http: RemoteOptions = NO_HTTP_OPTIONS  # header=, ca_file=, ... for http(s) archives
    index: str | None = None  # where a compressed archive's seek index is kept (default: index.py)
    noindex: bool = False  # keep no index on disk
    all_files: bool = False  # -o all: every regular file, not only the disk images
    nonempty: bool = False  # -o nonempty: mount over a file that has bytes of its own
    workers: int | None = None  # -o workers=N: processes serving the mount (None: Assembly.processes)
    max_ratio: int = DEFAULT_MAX_RATIO  # -o max_ratio=N: bound of the wait for a stream's size (0: none)
    spill_max: int | None = None  # -o spill_max=SIZE: the longest spill (None: spill.default_limit)
    cache_max: int = DEFAULT_CACHE_MAX  # -o cache_max=SIZE: what the cache directory may hold
    decoder_memory: int = DEFAULT_DECODER_MEMORY  # -o decoder_memory=SIZE: all decoders' windows, together


def default_workers(cpus: int) -> int:
    """The -o workers default for a process that may run on `cpus` CPUs (taskset and cpusets count)."""
    return max(1, min(DEFAULT_WORKERS_MAX, cpus // CPUS_PER_WORKER))


# Words that fstab, mount(8) and mount.fuse3 pass along and that mean nothing here (as in s3ql/sshfs).
# mount.fuse3 passes "rw,dev,suid" when nothing else is said: dev/suid/exec are moot on a lone 0444 file.
# fmt: off
_IGNORED = frozenset({
    "ro", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
    "_netdev", "nonempty", "async", "sync", "dev", "suid", "exec",
})
# Generic mount flags that libfuse's mount understands: passed through as they are.
_PASSED = frozenset({
    "allow_other", "auto_unmount", "nosuid", "nodev", "noexec", "noatime", "atime", "relatime",
    "norelatime", "strictatime", "nodiratime", "diratime", "dirsync", "lazytime", "nolazytime",
})
# fmt: on
# uid_t and gid_t are 32 bits, and (uid_t)-1 means "no change" to chown(2): never a file's owner.
_OPTION_MAX = {"uid": 2**32 - 2, "gid": 2**32 - 2, "umask": 0o777, "workers": MAX_WORKERS}
# fmt: off
_OURS = (
    "member", "uid", "gid", "umask", "fsname", "readahead_kb", "index", "cache_size", "workers",
    "decoder_memory", "max_ratio",
)
# fmt: on
_SIZE = re.compile(r"(\d+)\s*([kmgKMG]?)(?:i?[bB])?")  # cache_size=: bytes, K, M or G (binary: 64M is 64 MiB)
_SIZES = ("cache_size", "decoder_memory", "spill_max", "cache_max")  # sizes, as _SIZE reads them


def split_mount_options(words: list[str], rw_is_default: bool = False) -> MountOptions:
    """Parse comma-separated -o words; raise UsageError naming any word that is wrong.

    mount(8) hands every helper "rw" unless told "ro", so `rw_is_default` (set when mount(8) runs us)
    accepts it: the mount is read-only either way, as `mount` of a write-protected device is.
    """
    options = MountOptions()
    http_words = []
    for word in (w for group in words for w in group.split(",") if w):
        key, has_value, value = word.partition("=")
        if (key in _OURS or key in _SIZES) and has_value:
            _set_option(options, key, value)
        elif key in http_options.OPTION_KEYS and (has_value or word in http_options.FLAG_KEYS):
            http_words.append(word)
        elif word == "noindex":
            options.noindex = True
        elif word == "all":
            options.all_files = True
        elif word == "nonempty":  # libfuse 3 has no such option: it is ours to check
            options.nonempty = True
        elif word == "rw":
            if not rw_is_default:
                raise UsageError(
                    "option 'rw': tarfuse mounts are read-only; for writes put a qcow2 overlay on "
                    "the image (qemu-img create -f qcow2 -b MNT/IMAGE -F raw overlay.qcow2)"
                )
        elif word in _IGNORED or key.startswith(("x-", "comment")):
            continue
        elif word in _PASSED:
            options.fuse.add(word)
        else:
            raise UsageError(f"unknown mount option {word!r} (see tarfuse --help)")
    if http_words:
        options.http = http_options.parse_options(http_words)
    return options


def _set_option(options: MountOptions, key: str, value: str) -> None:
    if key in ("member", "fsname", "index"):
        if not value:
            raise UsageError(f"option {key}= needs a value")
        setattr(options, key, value)
        return
    if key in _SIZES:
        if (match := _SIZE.fullmatch(value.strip())) is None:
            raise UsageError(f"option {key}={value!r}: use bytes or a K, M or G suffix (e.g. {key}=64M)")
        setattr(options, key, int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2].upper()])
        return
    base = 8 if key == "umask" else 10
    try:
        number = int(value, base)
    except ValueError:
        raise UsageError(f"option {key}={value!r} is not a number") from None
    limit = _OPTION_MAX.get(key)
    if number < 0 or (limit is not None and number > limit):
        most = "" if limit is None else f"; at most {limit:o}" if base == 8 else f"; at most {limit}"
        raise UsageError(f"option {key}={value!r} is out of range{most}")
    if key == "workers" and number == 0:
        raise UsageError("option workers=0: at least one process must serve the mount")
    setattr(options, key, number)
