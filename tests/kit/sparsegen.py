"""Random sparse layouts (Hypothesis strategies), their expected bytes, and sparse files on disk.

A layout is an image size plus sorted, non-overlapping data extents. The expected image is computed here,
so a test's oracle never depends on how a filesystem or a tar program detects holes.
"""

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

Extent = tuple[int, int]  # (offset in the image, length)


@dataclass(frozen=True)
class Layout:
    """An image of `size` bytes whose data is in `extents`; the rest is holes."""

    size: int
    extents: tuple[Extent, ...]


def layout_from_runs(runs: Sequence[tuple[int, int]], tail: int) -> Layout:
    """Build a layout from (gap, length) runs and the hole after the last run.

    A gap of 0 puts data at the very start (or glues it to the run before), a tail of 0 puts it at the very
    end; no runs at all is the empty file (tail 0) or an all-hole file.
    """
    extents: list[Extent] = []
    offset = 0
    for gap, length in runs:
        offset += gap
        if extents and gap == 0:  # adjacent runs are one extent, as any tar would store them
            start, previous = extents.pop()
            extents.append((start, previous + length))
        else:
            extents.append((offset, length))
        offset += length
    return Layout(offset + tail, tuple(extents))


def layouts(
    max_runs: int = 8, small: int = 3000, large: int = 40_000, max_length: int = 12_000
) -> st.SearchStrategy[Layout]:
    """Random layouts: unaligned gaps and lengths, with some holes big enough to be filesystem holes."""
    gaps = st.one_of(st.just(0), st.integers(1, small), st.integers(4096, large))
    lengths = st.one_of(st.integers(1, small), st.integers(1, max_length))
    return st.builds(
        layout_from_runs,
        st.lists(st.tuples(gaps, lengths), max_size=max_runs),
        st.one_of(st.just(0), st.integers(1, small), st.integers(4096, large)),
    )


def gnu_layouts(max_runs: int = 8) -> st.SearchStrategy[Layout]:
    """Layouts as GNU tar and bsdtar store them: every data run but the last fills whole 512-byte blocks.

    They find holes in filesystem blocks; a map with a shorter run in the middle is one that GNU tar and
    the other readers would expand differently, and tarfuse refuses it.
    """
    blocks = st.integers(1, 8).map(lambda n: 512 * n)
    gaps = st.one_of(st.just(0), st.integers(1, 3000), st.integers(4096, 40_000))
    runs = st.lists(st.tuples(gaps, blocks), max_size=max_runs)
    last = st.integers(0, 511)  # the last run may end anywhere
    tail = st.one_of(st.just(0), st.integers(1, 3000), st.integers(4096, 40_000))
    return st.builds(_with_longer_last_run, runs, last, tail)


def _with_longer_last_run(runs: list[tuple[int, int]], extra: int, tail: int) -> Layout:
    if runs:
        runs = [*runs[:-1], (runs[-1][0], runs[-1][1] + extra)]
    return layout_from_runs(runs, tail)


_NO_ZERO = bytes([1, *range(1, 256)])  # translate() table: 0 becomes 1, the rest stay


def fill(length: int, seed: int) -> bytes:
    """Deterministic random data with no zero bytes, so a data run never looks like a hole."""
    return random.Random(seed).randbytes(length).translate(_NO_ZERO)


def image_of(layout: Layout, seed: int = 0) -> bytes:
    """The expanded image: extents filled with data, zeros elsewhere."""
    image = bytearray(layout.size)
    for i, (offset, length) in enumerate(layout.extents):
        image[offset : offset + length] = fill(length, seed + i)
    return bytes(image)


def packed(layout: Layout, image: bytes) -> bytes:
    """What a sparse member stores: the extents' bytes back to back."""
    return b"".join(image[offset : offset + length] for offset, length in layout.extents)


def write_sparse_file(path: str | os.PathLike[str], layout: Layout, seed: int = 0) -> bytes:
    """Create `path` as a sparse file with the layout's data (holes are never written); return its bytes."""
    image = image_of(layout, seed)
    with open(path, "wb") as f:
        for offset, length in layout.extents:
            os.pwrite(f.fileno(), image[offset : offset + length], offset)
        f.truncate(layout.size)
    return image
