"""Decode the four GNU sparse dialects into one validated, compact SparseMap.

Dialects (GNU tar manual, "Storing Sparse Files"): old GNU type 'S' (4 slots in the header plus a chain of
21-slot extension blocks), PAX 0.0 (repeated GNU.sparse.offset/numbytes records), PAX 0.1 (one
GNU.sparse.map record) and PAX 1.0 (a decimal map at the start of the data area). bsdtar writes PAX 1.0.
Must not import pyfuse3 or trio.
"""

import itertools
import operator
from array import array
from dataclasses import dataclass

from tarfuse import tarheader as th
from tarfuse.archive import Member, Pread, SparseSpec, read_exact
from tarfuse.errors import BadHeader, CorruptSparseMap

MAX_REAL_SIZE = 2**63 - 1  # off_t: neither the kernel nor FUSE can describe a larger file
_MAP_CHUNK = 64 * 1024  # PAX 1.0 maps are read this much at a time, never more than the member holds


@dataclass(frozen=True, slots=True)
class SparseMap:
    """Data extents of an image, sorted; everything between them is a hole.

    Three parallel arrays of 64-bit integers (24 bytes an extent) instead of a list of tuples, so that a
    million-extent map stays small; lookups bisect `logical`.
    """

    real_size: int
    logical: array  # type: ignore[type-arg]  # image offset of each extent
    lengths: array  # type: ignore[type-arg]
    physical: array  # type: ignore[type-arg]  # archive offset of each extent's first byte

    @property
    def stored_bytes(self) -> int:
        """Bytes of real data, i.e. what `du` of the extracted file would count at best."""
        return sum(self.lengths)


def decode(member: Member, pread: Pread) -> SparseMap:
    """Return the data extents of a file member, reading a PAX 1.0 or old GNU map from the archive."""
    spec = member.sparse
    if spec is None:
        size = member.stored_size
        count = 1 if size else 0  # an empty file has no extent at all
        return _arrays(size, [0] * count, [size] * count, [member.data_offset] * count)
    if spec.variant == "oldgnu":
        numbers = _old_gnu_numbers(spec, pread)
        data_offset, data_size = member.data_offset, member.stored_size
    elif spec.variant == "pax1.0":
        numbers, map_size = _pax10_numbers(member, pread)
        data_offset, data_size = member.data_offset + map_size, member.stored_size - map_size
    else:
        numbers = _pax0_numbers(spec)
        data_offset, data_size = member.data_offset, member.stored_size
    return _validated(member, numbers, data_offset, data_size)


def _arrays(real_size: int, logical: list[int], lengths: list[int], physical: list[int]) -> SparseMap:
    return SparseMap(real_size, array("q", logical), array("q", lengths), array("q", physical))


def _old_gnu_numbers(spec: SparseSpec, pread: Pread) -> list[int]:
    """Read the 'S' header and its extension blocks; return offset, numbytes, offset, ... ."""
    blocks = read_exact(pread, (1 + spec.extension_blocks) * th.BLOCK_SIZE, spec.header_offset)
    numbers = th.parse_sparse_numbers(blocks[386:482], th.OLD_GNU_SPARSE_ENTRIES)
    for start in range(th.BLOCK_SIZE, len(blocks), th.BLOCK_SIZE):
        try:
            numbers += th.parse_extension_block(blocks[start : start + th.BLOCK_SIZE])[0]
        except BadHeader as exc:
            raise CorruptSparseMap(
                f"bad sparse extension block: {exc.reason}", spec.header_offset + start
            ) from None
    return numbers


def _pax0_numbers(spec: SparseSpec) -> list[int]:
    """PAX 0.1 keeps "off,size,off,size" in GNU.sparse.map; 0.0 repeats offset/numbytes records."""
    where = spec.header_offset
    records = spec.pax_records
    declared = [value for key, value in records if key == "GNU.sparse.numblocks"]
    if spec.variant == "pax0.1":
        text = [value for key, value in records if key == "GNU.sparse.map"][-1]
        numbers = _decimals(text.split(",") if text else [], where)
    else:
        keys = [key for key, _ in records if key in ("GNU.sparse.offset", "GNU.sparse.numbytes")]
        if keys != ["GNU.sparse.offset", "GNU.sparse.numbytes"] * (len(keys) // 2) or len(keys) % 2:
            raise CorruptSparseMap("GNU.sparse.offset/numbytes records do not come in pairs", where)
        numbers = _decimals(
            [v for k, v in records if k in ("GNU.sparse.offset", "GNU.sparse.numbytes")], where
        )
    if len(numbers) % 2:
        raise CorruptSparseMap("sparse map has an odd number of values", where)
    if declared and _decimals(declared[-1:], where) != [len(numbers) // 2]:
        raise CorruptSparseMap(
            f"GNU.sparse.numblocks={declared[-1]} but the map has {len(numbers) // 2} entries",
            where,
        )
    return numbers


def _pax10_numbers(member: Member, pread: Pread) -> tuple[list[int], int]:
    """Read the PAX 1.0 map: decimal lines "count", then offset/size pairs, padded to a block.

    Returns the numbers and the padded size of the map, which precedes the data in the member.
    """
    where = member.data_offset
    chunks: list[bytes] = []
    read = newlines = 0
    wanted = 1  # lines needed: 1 + 2 * count, known once the first line is in
    count: int | None = None
    while newlines < wanted:
        if read >= member.stored_size:
            raise CorruptSparseMap("PAX 1.0 sparse map runs past the member's data", where)
        chunk = read_exact(pread, min(_MAP_CHUNK, member.stored_size - read), where + read)
        chunks.append(chunk)
        read += len(chunk)
        newlines += chunk.count(b"\n")
        if count is None and newlines:  # the count line may span chunks (leading zeros are valid)
            count = _decimals([b"".join(chunks).split(b"\n", 1)[0].decode("latin-1")], where)[0]
            if 4 * count > member.stored_size:  # an entry takes at least 4 bytes ("0\n0\n")
                raise CorruptSparseMap(f"PAX 1.0 map claims {count} entries", where)
            wanted = 1 + 2 * count
    # One decode of the whole map, not one per line; latin-1 keeps one character per byte.
    lines = b"".join(chunks).decode("latin-1").split("\n", wanted)
    numbers = _decimals(lines[1:wanted], where)
    map_size = read - len(lines[wanted]) if len(lines) > wanted else read
    padded = -(-map_size // th.BLOCK_SIZE) * th.BLOCK_SIZE
    if padded > member.stored_size:
        raise CorruptSparseMap("PAX 1.0 sparse map runs past the member's data (into its padding)", where)
    return numbers, padded


def _decimals(values: list[str], where: int) -> list[int]:
    # The usual case stays in C (map, not a generator) for maps of millions of values.
    if (
        all(map(str.isdigit, values))
        and all(map(str.isascii, values))
        and max(map(len, values), default=0) <= th.MAX_DECIMAL_DIGITS
    ):
        return list(map(int, values))
    try:
        return [th.parse_decimal(value) for value in values]
    except BadHeader as exc:
        raise CorruptSparseMap(f"sparse map value {exc.reason}", where) from None


def _validated(member: Member, numbers: list[int], data_offset: int, data_size: int) -> SparseMap:
    """Check the map the way a careful extractor must, then pack it into arrays."""
    where = member.sparse.header_offset if member.sparse else member.header_offset
    if member.real_size > MAX_REAL_SIZE:
        raise CorruptSparseMap(
            f"member {member.name!r}: real size {member.real_size} is larger than any file can be", where
        )
    offsets, lengths = numbers[0::2], numbers[1::2]
    if 0 in lengths:  # GNU tar ends every map with (real_size, 0); old GNU pads with (0, 0)
        offsets, lengths = list(itertools.compress(offsets, lengths)), list(filter(None, lengths))
    if offsets and (min(offsets) < 0 or min(lengths) < 0):  # base-256 can encode negatives
        raise CorruptSparseMap(f"member {member.name!r}: negative sparse map entry", where)
    ends = list(map(operator.add, offsets, lengths))
    if not all(map(operator.le, ends, offsets[1:])):
        i = next(i for i in range(len(offsets) - 1) if ends[i] > offsets[i + 1])
        raise CorruptSparseMap(
            f"member {member.name!r}: sparse map entry {i + 1} (offset {offsets[i + 1]}) is unsorted "
            f"or overlaps the one before (which ends at {ends[i]})",
            where,
        )
    if ends and ends[-1] > member.real_size:
        raise CorruptSparseMap(
            f"member {member.name!r}: sparse data ends at {ends[-1]}, past the real size {member.real_size}",
            where,
        )
    if (total := sum(lengths)) > data_size:
        raise CorruptSparseMap(
            f"member {member.name!r}: sparse map lists {total} bytes of data but only {data_size} are stored",
            where,
        )
    physical = list(itertools.accumulate(lengths[:-1], initial=data_offset)) if lengths else []
    # Every value now fits 64 bits: extents end by real_size <= MAX_REAL_SIZE, data within the archive.
    return _arrays(member.real_size, offsets, lengths, physical)
