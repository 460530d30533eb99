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
from tarfuse.errors import CorruptSparseMap

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
    numbers: list[int] = []
    for entry in th.parse_sparse_entries(blocks[386:482], th.OLD_GNU_SPARSE_ENTRIES):
        numbers += entry
    for start in range(th.BLOCK_SIZE, len(blocks), th.BLOCK_SIZE):
        entries, _ = th.parse_extension_block(blocks[start : start + th.BLOCK_SIZE])
        for entry in entries:
            numbers += entry
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
    while newlines < wanted:
        if read >= member.stored_size:
            raise CorruptSparseMap("PAX 1.0 sparse map runs past the member's data", where)
        chunk = read_exact(pread, min(_MAP_CHUNK, member.stored_size - read), where + read)
        chunks.append(chunk)
        read += len(chunk)
        newlines += chunk.count(b"\n")
        if len(chunks) == 1 and newlines:
            count = _decimals([chunk.split(b"\n", 1)[0].decode("ascii", "replace")], where)[0]
            if 4 * count > member.stored_size:  # an entry takes at least 4 bytes ("0\n0\n")
                raise CorruptSparseMap(f"PAX 1.0 map claims {count} entries", where)
            wanted = 1 + 2 * count
    lines = b"".join(chunks).split(b"\n", wanted)
    numbers = _decimals([line.decode("ascii", "replace") for line in lines[1:wanted]], where)
    map_size = read - len(lines[wanted]) if len(lines) > wanted else read
    return numbers, -(-map_size // th.BLOCK_SIZE) * th.BLOCK_SIZE


def _decimals(values: list[str], where: int) -> list[int]:
    if not all(v.isascii() and v.isdigit() for v in values):
        bad = next(v for v in values if not (v.isascii() and v.isdigit()))
        raise CorruptSparseMap(f"sparse map value {bad[:40]!r} is not a decimal number", where)
    return list(map(int, values))


def _validated(member: Member, numbers: list[int], data_offset: int, data_size: int) -> SparseMap:
    """Check the map the way a careful extractor must, then pack it into arrays."""
    where = member.sparse.header_offset if member.sparse else member.header_offset
    offsets, lengths = numbers[0::2], numbers[1::2]
    if 0 in lengths:  # GNU tar ends every map with (real_size, 0); old GNU pads with (0, 0)
        kept = [i for i, n in enumerate(lengths) if n]
        offsets, lengths = [offsets[i] for i in kept], [lengths[i] for i in kept]
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
    try:
        return _arrays(member.real_size, offsets, lengths, physical)
    except OverflowError:
        raise CorruptSparseMap(f"member {member.name!r}: absurd sparse map values", where) from None
