"""mapper: ImageMapper against a reference expansion, with a read_at that returns short reads."""

import itertools
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kit import sparsegen

from tarfuse.errors import TruncatedArchive
from tarfuse.image.mapper import HOLE, ImageMapper, PreadInto
from tarfuse.tar.archive import ReadAt
from tarfuse.tar.sparse import SparseMap

PREFIX = b"\xee" * 1536  # archive bytes before the member's data: never part of the image


def sparse_map(layout: sparsegen.Layout, data_offset: int = len(PREFIX)) -> SparseMap:
    """The map of `layout` with its data packed back to back from `data_offset`."""
    physical = []
    for _, length in layout.extents:
        physical.append(data_offset)
        data_offset += length
    return SparseMap(
        layout.size,
        array("q", [offset for offset, _ in layout.extents]),
        array("q", [length for _, length in layout.extents]),
        array("q", physical),
    )


def archive_of(layout: sparsegen.Layout, image: bytes) -> bytes:
    return PREFIX + sparsegen.packed(layout, image) + b"\xee" * 100


def short_read_at(archive: bytes, chunk: int) -> ReadAt:
    """A read_at that never returns more than `chunk` bytes, as a pipe or a network filesystem may."""

    def read_at(offset: int, size: int) -> bytes:
        return archive[offset : offset + min(size, chunk)]

    return read_at


def short_pread_into(archive: bytes, chunk: int) -> PreadInto:
    def pread_into(buffer: memoryview, offset: int) -> int:
        data = archive[offset : offset + min(len(buffer), chunk)]
        buffer[: len(data)] = data
        return len(data)

    return pread_into


reads = st.tuples(st.integers(0, 120_000), st.integers(0, 70_000))


@given(layout=sparsegen.layouts(), read=reads, chunk=st.integers(1, 5000), seed=st.integers(0, 9))
def test_read_matches_expanded_image(
    layout: sparsegen.Layout, read: tuple[int, int], chunk: int, seed: int
) -> None:
    image = sparsegen.image_of(layout, seed)
    mapper = ImageMapper(short_read_at(archive_of(layout, image), chunk), sparse_map(layout))
    offset, size = read
    assert mapper.size == layout.size
    assert mapper.read(offset, size) == image[offset : offset + size]


@given(layout=sparsegen.layouts(), read=reads, chunk=st.integers(1, 5000))
def test_read_into_matches_expanded_image(
    layout: sparsegen.Layout, read: tuple[int, int], chunk: int
) -> None:
    image = sparsegen.image_of(layout)
    archive = archive_of(layout, image)
    mapper = ImageMapper(short_read_at(archive, 1), sparse_map(layout), short_pread_into(archive, chunk))
    offset, size = read
    buffer = bytearray(b"\xaa" * size)
    count = mapper.read_into(memoryview(buffer), offset)
    assert bytes(buffer[:count]) == image[offset : offset + size]


@given(layout=sparsegen.layouts(), read=reads)
def test_plan_tiles_the_request(layout: sparsegen.Layout, read: tuple[int, int]) -> None:
    image = sparsegen.image_of(layout)
    archive = archive_of(layout, image)
    mapper = ImageMapper(short_read_at(archive, 1 << 30), sparse_map(layout))
    offset, size = read
    pieces = mapper.plan(offset, size)
    assert all(length > 0 for _, length in pieces)
    assert sum(length for _, length in pieces) == max(0, min(offset + size, layout.size) - offset)
    assert all(not (a == b == HOLE) for (a, _), (b, _) in itertools.pairwise(pieces))
    expanded = b"".join(
        bytes(length) if physical == HOLE else archive[physical : physical + length]
        for physical, length in pieces
    )
    assert expanded == image[offset : offset + size]


def test_plan_of_a_read_inside_one_extent_is_one_piece() -> None:
    layout = sparsegen.Layout(10_000, ((1000, 5000),))
    mapper = ImageMapper(short_read_at(b"", 1), sparse_map(layout, data_offset=7))
    assert mapper.plan(2000, 100) == [(7 + 1000, 100)]
    assert mapper.plan(0, 10_000) == [(HOLE, 1000), (7, 5000), (HOLE, 4000)]
    assert mapper.plan(9000, 5000) == [(HOLE, 1000)]
    assert mapper.plan(10_000, 5000) == []
    assert mapper.plan(20_000, 5000) == []


def test_adjacent_extents_are_separate_pieces_without_a_hole() -> None:
    layout = sparsegen.Layout(30, ((0, 10), (10, 10)))
    mapper = ImageMapper(short_read_at(b"", 1), sparse_map(layout, data_offset=100))
    assert mapper.plan(5, 10) == [(105, 5), (110, 5)]


def test_read_of_data_cut_off_raises_truncated_with_offset() -> None:
    layout = sparsegen.Layout(10_000, ((0, 4000), (8000, 2000)))
    image = sparsegen.image_of(layout)
    archive = archive_of(layout, image)[: len(PREFIX) + 5000]  # the archive shrank under the mount
    mapper = ImageMapper(short_read_at(archive, 700), sparse_map(layout))
    assert mapper.read(0, 4000) == image[:4000]
    with pytest.raises(TruncatedArchive) as info:
        mapper.read(7000, 3000)
    assert info.value.offset == len(PREFIX) + 4000


def test_read_into_of_data_cut_off_raises_truncated() -> None:
    layout = sparsegen.Layout(10_000, ((8000, 2000),))
    archive = archive_of(layout, sparsegen.image_of(layout))[: len(PREFIX) + 100]
    mapper = ImageMapper(short_read_at(archive, 1), sparse_map(layout), short_pread_into(archive, 64))
    with pytest.raises(TruncatedArchive) as info:
        mapper.read_into(memoryview(bytearray(4096)), 7000)
    assert info.value.offset == len(PREFIX)


def test_empty_image() -> None:
    mapper = ImageMapper(short_read_at(b"", 1), sparse_map(sparsegen.Layout(0, ())))
    assert (mapper.size, mapper.read(0, 10), mapper.plan(0, 10)) == (0, b"", [])


@given(size=st.integers(1, 20_000), read=reads, chunk=st.integers(1, 5000))
def test_read_into_of_a_plain_member_matches_its_data(size: int, read: tuple[int, int], chunk: int) -> None:
    layout = sparsegen.Layout(size, ((0, size),))  # one extent over the whole image: the fast path
    image = sparsegen.image_of(layout)
    archive = archive_of(layout, image)
    mapper = ImageMapper(short_read_at(archive, 1), sparse_map(layout), short_pread_into(archive, chunk))
    offset, length = read
    buffer = bytearray(b"\xaa" * length)
    count = mapper.read_into(memoryview(buffer), offset)
    assert bytes(buffer[:count]) == image[offset : offset + length]


def test_read_into_of_a_cut_off_plain_member_raises_truncated() -> None:
    layout = sparsegen.Layout(10_000, ((0, 10_000),))
    archive = archive_of(layout, sparsegen.image_of(layout))[: len(PREFIX) + 6000]
    mapper = ImageMapper(short_read_at(archive, 1), sparse_map(layout), short_pread_into(archive, 4096))
    with pytest.raises(TruncatedArchive):
        mapper.read_into(memoryview(bytearray(4096)), 4000)


def mapper_of(size: int, extents: list[tuple[int, int, int]]) -> ImageMapper:
    """A mapper of (image offset, length, archive offset) extents, as given: no check, no read."""
    columns = [array("q", column) for column in zip(*extents, strict=True)] or [array("q")] * 3
    return ImageMapper(lambda offset, n: bytes(n), SparseMap(size, *columns))


def test_extents_are_packed_triples_in_order() -> None:
    extents = mapper_of(10_000, [(0, 100, 512), (1000, 200, 612), (5000, 5000, 812)]).extents()
    assert (extents.typecode, extents.itemsize) == ("q", 8)  # what the C side reads: native int64
    assert extents.tolist() == [0, 100, 512, 1000, 200, 612, 5000, 5000, 812]


def test_extents_keep_empty_ones_that_the_c_side_leaves_out() -> None:
    extents = mapper_of(2000, [(0, 100, 512), (1000, 0, 612), (1000, 200, 612)]).extents()
    assert extents.tolist() == [0, 100, 512, 1000, 0, 612, 1000, 200, 612]


def test_extents_are_cut_at_the_image_end() -> None:
    """The C side refuses an extent past the size: the one across the end is cut, those after it go."""
    mapper = mapper_of(10_000, [(0, 100, 512), (5000, 6000, 612), (10_000, 0, 6612), (12_000, 5, 6612)])
    assert mapper.extents().tolist() == [0, 100, 512, 5000, 5000, 612]


def test_extents_ending_at_the_image_end_stay_whole() -> None:
    mapper = mapper_of(10_000, [(0, 100, 512), (5000, 5000, 612), (10_000, 0, 5612)])
    assert mapper.extents().tolist() == [0, 100, 512, 5000, 5000, 612]


def test_extents_of_a_map_without_any() -> None:
    assert mapper_of(0, []).extents().tolist() == []
    assert mapper_of(4096, []).extents().tolist() == []  # all hole
