"""The tarfuse exception tree.

Modules raise these and never log, so that the caller decides what a failure means; the boundaries
(serve/fs.py, serve/daemon.py, cli.py) turn them into errno values, log lines and exit codes. The one
module that logs besides them is the background pass (sources/index.py): it runs on its own thread, with no
caller to raise to, so it logs what it finds and fails later reads through its source (mark_broken).
tests/test_layering.py holds this. This module imports nothing from the package.
"""


class TarfuseError(Exception):
    """Base of every error tarfuse reports to the user."""


class UsageError(TarfuseError):
    """The command line or a mount option is wrong."""


class ArchiveError(TarfuseError):
    """The archive cannot be served; `offset` is where in the archive the problem was found.

    In a compressed archive, offsets of the tar reader are positions in the decompressed stream.
    """

    offset_kind = "archive"

    def __init__(self, reason: str, offset: int | None = None) -> None:
        self.reason = reason
        self.offset = offset
        where = f" at {self.offset_kind} offset {offset}" if offset is not None else ""
        super().__init__(f"{reason}{where}")


class BadHeader(ArchiveError):
    """A tar header block is malformed (checksum, number field, PAX record)."""


class TruncatedArchive(ArchiveError):
    """The archive ends before a header or a member's data does."""


class CorruptSparseMap(ArchiveError):
    """A sparse map is unsorted, overlapping, past the real size or past the stored data."""


class CompressedArchive(ArchiveError):
    """The archive is compressed in a format tarfuse cannot serve (lz4, lzip, compress)."""


class CorruptCompressed(ArchiveError):
    """The compressed stream is cut short or corrupt; `offset` is in the decompressed stream."""

    offset_kind = "decompressed"


class NoImage(ArchiveError):
    """No member, or more than one, qualifies as the disk image."""


class ArchiveChanged(ArchiveError):
    """The archive file changed under a live mount, so its bytes can no longer be trusted."""


class RemoteError(ArchiveError):
    """The web server holding a remote archive refused or failed a request, even after retries."""
