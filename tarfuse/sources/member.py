"""A tar member's bytes as a source of their own: what a compressed image inside a tar decompresses from.

`disk.raw.xz` inside `appliance.tar.gz` is read through three layers: the archive (a file or a URL), its
decompressed stream, the member's byte range in it, and that range decompressed again. The member's range
is read through the image mapper the tar layer built for it, so it is served exactly as `tar -x` would
write the member (a sparse member's holes as zeros), and this source only adds bounds and the archive's
checks. It owns nothing: the mount closes the archive under it.
"""

from collections.abc import Callable

from tarfuse.sources.file import ByteSource, Identity, IndexHome, SourceDefaults

ReadInto = Callable[[memoryview, int], int]  # (buffer, offset) -> bytes filled, short only at the end


class MemberSource(SourceDefaults):
    """The `size` bytes that `read_into` gives of a member of `archive`, named `name` inside it."""

    size_known = True
    index_home = IndexHome.INNER

    def __init__(self, archive: ByteSource, read_into: ReadInto, size: int, name: str, header: int) -> None:
        self.path = f"{archive.path}:{name}"  # for messages only: side files are keyed by identity()
        self.size = size
        self.blocking = archive.blocking
        self.readers = archive.readers
        self._archive, self._read_into, self._header = archive, read_into, header

    def read_at(self, offset: int, size: int) -> bytes:
        buffer = bytearray(max(min(size, self.size - offset), 0))
        filled = self.pread_into(memoryview(buffer), offset)
        return bytes(buffer[:filled])

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        if offset >= self.size:
            return 0
        return self._read_into(buffer[: self.size - offset], offset)

    def check_unchanged(self) -> None:
        self._archive.check_unchanged()

    def identity(self) -> Identity:
        """The archive's version and where the member's header is in it: one member of one archive."""
        return [*self._archive.identity(), self._header]

    def close(self) -> None:
        """Nothing to release: the archive belongs to the mount."""
