"""Decode the four GNU sparse dialects into one validated, compact SparseMap.

Dialects (GNU tar manual, "Storing Sparse Files"): old GNU type 'S' (4 slots in the header plus a chain of
21-slot extension blocks), PAX 0.0 (repeated GNU.sparse.offset/numbytes records), PAX 0.1 (one
GNU.sparse.map record) and PAX 1.0 (a decimal map at the start of the data area). bsdtar writes PAX 1.0.
"""

import contextlib
import itertools
import operator
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from tarfuse.errors import BadHeader, CorruptSparseMap
from tarfuse.tar import header as th
from tarfuse.tar.archive import MAX_SPARSE_ENTRIES, Member, ReadAt, SparseSpec, read_exact

MAX_REAL_SIZE = 2**63 - 1  # off_t: neither the kernel nor FUSE can describe a larger file
_MAP_CHUNK = 64 * 1024  # maps are read and split this much at a time, never more than the member holds
_CHAIN_CHUNK = _MAP_CHUNK // th.BLOCK_SIZE  # old GNU extension blocks read at a time

# array("q"): 64-bit integers. Quoted, because array.array takes no type argument at run time before 3.12.
Int64Array: TypeAlias = "array[int]"


@dataclass(frozen=True, slots=True)
class SparseMap:
    """Data extents of an image, sorted; everything between them is a hole.

    Three parallel arrays of 64-bit integers (24 bytes an extent) instead of a list of tuples, so that a
    million-extent map stays small; lookups bisect `logical`.
    """

    real_size: int
    logical: Int64Array  # image offset of each extent
    lengths: Int64Array
    physical: Int64Array  # archive offset of each extent's first byte

    @property
    def stored_bytes(self) -> int:
        """Bytes of real data, i.e. what `du` of the extracted file would count at best."""
        return sum(self.lengths)


def decode(member: Member, read_at: ReadAt) -> SparseMap:
    """Return the data extents of a file member, reading a PAX 1.0 or old GNU map from the archive."""
    spec = member.sparse
    if spec is None:
        size = member.stored_size
        count = 1 if size else 0  # an empty file has no extent at all
        return SparseMap(
            size, _int64s([0] * count), _int64s([size] * count), _int64s([member.data_offset] * count)
        )
    if spec.variant == "oldgnu":
        numbers = _old_gnu_numbers(spec, read_at)
        data_offset, data_size = member.data_offset, member.stored_size
    elif spec.variant == "pax1.0":
        numbers, map_size = _pax10_numbers(member, read_at)
        data_offset, data_size = member.data_offset + map_size, member.stored_size - map_size
    else:
        numbers = _pax0_numbers(spec, read_at)
        data_offset, data_size = member.data_offset, member.stored_size
    _check_count(len(numbers) // 2, spec.header_offset)
    return _validated(member, numbers, data_offset, data_size)


def _check_count(entries: int, where: int) -> None:
    """Refuse a map of more entries than MAX_SPARSE_ENTRIES (archive.py says why that many)."""
    if entries > MAX_SPARSE_ENTRIES:
        raise CorruptSparseMap(
            f"sparse map claims {entries} entries: tarfuse reads at most {MAX_SPARSE_ENTRIES}", where
        )


def _int64s(values: Iterable[int], where: int | None = None) -> Int64Array:
    """Pack numbers into 64-bit integers: 8 bytes each, where a list of ints costs ~36."""
    try:
        return array("q", values)
    except OverflowError:  # PAX allows 20 digits, more than 64 bits hold
        raise CorruptSparseMap("sparse map value too large for a 64-bit offset", where) from None


def _old_gnu_numbers(spec: SparseSpec, read_at: ReadAt) -> Int64Array:
    """Read the 'S' header and its extension blocks, a chunk at a time; return offset, numbytes, ... ."""
    where = spec.header_offset
    header = read_exact(read_at, where, th.BLOCK_SIZE)
    numbers = _int64s(th.parse_sparse_numbers(header[386:482], th.OLD_GNU_SPARSE_ENTRIES), where)
    for first in range(1, spec.extension_blocks + 1, _CHAIN_CHUNK):
        count = min(_CHAIN_CHUNK, spec.extension_blocks + 1 - first)
        blocks = read_exact(read_at, where + first * th.BLOCK_SIZE, count * th.BLOCK_SIZE)
        for start in range(0, len(blocks), th.BLOCK_SIZE):
            block_offset = where + first * th.BLOCK_SIZE + start
            try:
                numbers.extend(th.parse_extension_block(blocks[start : start + th.BLOCK_SIZE])[0])
            except BadHeader as exc:
                raise CorruptSparseMap(f"bad sparse extension block: {exc.reason}", block_offset) from None
            except OverflowError:  # base-256 fields can hold more than 64 bits
                raise CorruptSparseMap("sparse map value too large", block_offset) from None
    return numbers


def _pax0_numbers(spec: SparseSpec, read_at: ReadAt) -> Int64Array:
    """PAX 0.1 keeps "off,size,off,size" in GNU.sparse.map; 0.0 repeats offset/numbytes records.

    The records are read again from the member's 'x' payloads (at most archive.MAX_PAX_SIZE together).
    """
    where = spec.header_offset
    records = []
    for offset, size in spec.pax_payloads:
        records += th.parse_pax_records(read_exact(read_at, offset, size), offset)
    declared = [value for key, value in records if key == "GNU.sparse.numblocks"]
    if spec.variant == "pax0.1":
        numbers = _split_decimals([value for key, value in records if key == "GNU.sparse.map"][-1], where)
    else:
        keys = [key for key, _ in records if key in ("GNU.sparse.offset", "GNU.sparse.numbytes")]
        if keys != ["GNU.sparse.offset", "GNU.sparse.numbytes"] * (len(keys) // 2) or len(keys) % 2:
            raise CorruptSparseMap("GNU.sparse.offset/numbytes records do not come in pairs", where)
        values = [v for k, v in records if k in ("GNU.sparse.offset", "GNU.sparse.numbytes")]
        numbers = _int64s(_decimals(values, where), where)
    if len(numbers) % 2:
        raise CorruptSparseMap("sparse map has an odd number of values", where)
    if declared and _decimals(declared[-1:], where) != [len(numbers) // 2]:
        raise CorruptSparseMap(
            f"GNU.sparse.numblocks={declared[-1][:40]} but the map has {len(numbers) // 2} entries",
            where,
        )
    _check_numblocks_first([key for key, _ in records], where)
    return numbers


def _split_decimals(text: str, where: int) -> Int64Array:
    """Decode "1,2,3" a slice at a time: one str per value of a long map would cost 50 bytes each."""
    numbers = _int64s([])
    start = 0
    while text:
        end = text.find(",", start + _MAP_CHUNK)
        numbers.extend(_int64s(_decimals(text[start : None if end < 0 else end].split(","), where), where))
        if end < 0:
            break
        start = end + 1
    return numbers


_PAX0_MAP_KEYS = frozenset(("GNU.sparse.offset", "GNU.sparse.numbytes", "GNU.sparse.map"))


def _check_numblocks_first(keys: list[str], where: int) -> None:
    """GNU tar makes a new, empty map at each GNU.sparse.numblocks (xheader.c): it must come first.

    It must be there, too: GNU tar 1.34 calls every map entry beyond it "excess".
    """
    first = next((i for i, key in enumerate(keys) if key in _PAX0_MAP_KEYS), len(keys))
    if "GNU.sparse.numblocks" in keys[first:]:
        raise CorruptSparseMap("GNU.sparse.numblocks after the map has begun: GNU tar starts it over", where)
    if "GNU.sparse.numblocks" not in keys:
        raise CorruptSparseMap("PAX 0.x sparse map without GNU.sparse.numblocks", where)


def _pax10_numbers(member: Member, read_at: ReadAt) -> tuple[Int64Array, int]:
    """Read the PAX 1.0 map: decimal lines "count", then offset/size pairs, padded to a block.

    Returns the numbers and the padded size of the map, which precedes the data in the member. The map is
    parsed a chunk at a time into an array, so a million-extent map never exists as a million objects.
    """
    where = member.data_offset
    numbers = _int64s([])
    count: int | None = None  # from the first line
    carry = b""  # the start of a line that the end of a chunk cut
    read = 0
    map_size = 0
    while count is None or len(numbers) < 2 * count:
        if read >= member.stored_size:
            raise CorruptSparseMap("PAX 1.0 sparse map runs past the member's data", where)
        carry = _line_start(carry, where)  # the map goes on: `carry` is part of it
        chunk = read_exact(read_at, where + read, min(_MAP_CHUNK, member.stored_size - read))
        text_start = read - len(carry)  # member offset of the first byte of `text`
        read += len(chunk)
        text = carry + chunk
        lines = text.split(b"\n")
        carry = lines.pop()
        used = 0
        if count is None and lines:
            count = _decimals(lines[:1], where)[0]
            _check_count(count, where)  # before reading them: the member's size may be 2**62 (compressed)
            if 4 * count > member.stored_size:  # an entry takes at least 4 bytes ("0\n0\n")
                raise CorruptSparseMap(f"PAX 1.0 map claims {count} entries", where)
            used = 1
        if count is not None:
            wanted = lines[used : used + 2 * count - len(numbers)]
            numbers.extend(_int64s(_decimals(wanted, where), where))
            used += len(wanted)
            if len(numbers) == 2 * count:  # the map ends in this chunk, after line `used`
                map_size = text_start + len(b"\n".join(lines[:used])) + 1
    padded = -(-map_size // th.BLOCK_SIZE) * th.BLOCK_SIZE
    if padded > member.stored_size:
        raise CorruptSparseMap("PAX 1.0 sparse map runs past the member's data (into its padding)", where)
    return numbers, padded


def _line_start(carry: bytes, where: int) -> bytes:
    """The start of a map line that a chunk's end cut, kept short: a line that never ends is not held whole.

    Leading zeros go (GNU tar reads "0002" as 2; one zero stays, for a line "0"); what is left is no
    decimal of at most 20 digits if it is longer, and can only be refused.
    """
    short = carry.lstrip(b"0") or carry[:1]
    if len(short) > th.MAX_DECIMAL_DIGITS:
        raise CorruptSparseMap(
            f"PAX 1.0 sparse map line {short[:40]!r}... has more than {th.MAX_DECIMAL_DIGITS} digits", where
        )
    return short


def _decimals(values: list[str] | list[bytes], where: int) -> list[int]:
    """Decode decimal map values: PAX record text, or the raw lines of a PAX 1.0 map."""
    # The usual case stays in C for maps of millions of values: one isdigit over them all, then int(),
    # which refuses an empty value. A value too large for 64 bits is refused when packed (_int64s).
    if not values:
        return []
    joined = values[0][:0].join(values)  # type: ignore[arg-type]  # str or bytes, as the values are
    if joined.isascii() and joined.isdigit():
        with contextlib.suppress(ValueError):
            return list(map(int, values))
    try:
        return [th.parse_decimal(_text(value)) for value in values]
    except BadHeader as exc:
        raise CorruptSparseMap(f"sparse map value {exc.reason}", where) from None


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("latin-1")  # one character per byte


def _validated(
    member: Member,
    numbers: Int64Array,
    data_offset: int,
    data_size: int,
) -> SparseMap:
    """Check the map the way a careful extractor must, then pack it into arrays; `numbers` is emptied.

    GNU tar extracts a map entry by entry (src/sparse.c, sparse_extract_region): it seeks to the offset,
    then writes `numbytes` bytes taken from the next whole blocks of the archive, or truncates the file
    there if `numbytes` is 0, so the file ends where the map does. libarchive and tarfile read the data
    packed and make the file `real_size` long. Both give the same file only for a sorted map (zero-length
    entries included) that ends at the real size, whose data entries but the last fill whole blocks: what
    GNU tar and bsdtar write, since they find holes in filesystem blocks. Anything else is refused, not
    read one way or the other.
    """
    where = member.sparse.header_offset if member.sparse else member.header_offset
    name = member.name
    if member.real_size > MAX_REAL_SIZE:
        raise CorruptSparseMap(
            f"member {name!r}: real size {member.real_size} is larger than any file can be", where
        )
    offsets, lengths = numbers[0::2], numbers[1::2]
    del numbers[:]  # consumed: a million-extent map's flat copy would add 16 MB to the daemon's peak
    # Base-256 can encode negatives. Sorted entries of non-negative lengths (_check_order) make every
    # offset at least the first one.
    if offsets and (offsets[0] < 0 or min(lengths) < 0):
        raise CorruptSparseMap(f"member {name!r}: negative sparse map entry", where)
    _check_order(offsets, lengths, name, where)
    _check_end(offsets[-1] + lengths[-1] if offsets else 0, member.real_size, name, where)
    if 0 in lengths:  # GNU tar ends a map with (real_size, 0) when the file ends in a hole
        offsets, lengths = _int64s(itertools.compress(offsets, lengths)), _int64s(filter(None, lengths))
    but_last = max(len(lengths) - 1, 0)
    if any(map(operator.mod, itertools.islice(lengths, but_last), itertools.repeat(th.BLOCK_SIZE))):
        i = next(i for i in range(but_last) if lengths[i] % th.BLOCK_SIZE)
        raise CorruptSparseMap(
            f"member {name!r}: sparse data at {offsets[i]} is {lengths[i]} bytes, not whole blocks, and more "
            "follows: GNU tar reads the next data from the next block, other readers right after",
            where,
        )
    if (total := sum(lengths)) > data_size:
        raise CorruptSparseMap(
            f"member {name!r}: sparse map lists {total} bytes of data but only {data_size} are stored", where
        )
    # Every value fits 64 bits: extents end by real_size <= MAX_REAL_SIZE, data within the archive.
    physical = _int64s(itertools.accumulate(lengths, initial=data_offset))
    physical.pop()  # accumulate's last value is where the data ends, not an extent
    return SparseMap(member.real_size, offsets, lengths, physical)


def _check_order(offsets: Int64Array, lengths: Int64Array, name: str, where: int) -> None:
    """Each entry must start at or after the end of the one before, zero-length ones too."""
    # Iterators, not lists: a list of a million ends would cost more than the whole map.
    if not all(map(operator.le, map(operator.add, offsets, lengths), itertools.islice(offsets, 1, None))):
        i = next(i for i in range(len(offsets) - 1) if offsets[i] + lengths[i] > offsets[i + 1])
        raise CorruptSparseMap(
            f"member {name!r}: sparse map entry {i + 1} (offset {offsets[i + 1]}) is unsorted "
            f"or overlaps the one before (which ends at {offsets[i] + lengths[i]})",
            where,
        )


def _check_end(map_end: int, real_size: int, name: str, where: int) -> None:
    """The map must end exactly at the real size: where GNU tar's extracted file ends too."""
    if map_end > real_size:
        raise CorruptSparseMap(
            f"member {name!r}: sparse data ends at {map_end}, past the real size {real_size}", where
        )
    if map_end < real_size:  # GNU tar would extract map_end bytes, tarfile real_size
        raise CorruptSparseMap(
            f"member {name!r}: sparse map ends at {map_end}, before the real size {real_size} "
            f"(GNU tar writes a last entry ({real_size}, 0) for a file that ends in a hole)",
            where,
        )
