"""gztable.py on real gzip streams and rapidgzip's own index of them: the check a mount makes of a published
index's first seek point passes for the stream's own windows and bits, and fails for any other."""

import io
import random
import subprocess
import zlib

import pytest
import rapidgzip

from tarfuse.sources import gztable

MiB = 1 << 20


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[gztable.Point], bytes]:
    """A gzip stream of words (gzip -6: back references everywhere), its points and rapidgzip's blob."""
    rng = random.Random(5)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randint(2, 7))) for _ in range(3000)]
    data = b" ".join(rng.choices(words, k=1_500_000))[: 6 * MiB]
    path = tmp_path_factory.mktemp("gz") / "words.gz"
    path.write_bytes(subprocess.run(["gzip", "-6", "-n"], input=data, capture_output=True, check=True).stdout)
    with rapidgzip.RapidgzipFile(str(path), parallelization=1, chunk_size=256 * 1024) as gz:
        gz.read()
        exported = io.BytesIO()
        gz.export_index(exported, rapidgzip.IndexFormat.GZTOOL)
    blob = exported.getvalue()
    table = gztable.table_of(blob)
    assert table is not None
    points, _ = gztable.parse_table(table, len(blob))
    return path.read_bytes(), points, blob


def test_each_point_with_its_own_window_decompresses_right(
    indexed: tuple[bytes, list[gztable.Point], bytes],
) -> None:
    stream, points, blob = indexed
    assert len(points) > 4
    assert any(point.bits for point in points)  # points inside a byte are covered
    for point in points[1:]:
        if point.into + gztable.CHECK_INPUT > len(stream):
            break
        window = blob[point.position : point.position + point.length]
        assert gztable.decompresses_right(stream, point, window), point


def test_another_window_or_other_bits_do_not(indexed: tuple[bytes, list[gztable.Point], bytes]) -> None:
    stream, points, blob = indexed
    point, other = points[2], points[3]
    own = blob[point.position : point.position + point.length]
    assert gztable.decompresses_right(stream, point, own)
    assert not gztable.decompresses_right(stream, point, blob[other.position : other.position + other.length])
    assert not gztable.decompresses_right(stream, point, zlib.compress(bytes(32768)))
    assert not gztable.decompresses_right(stream, point, b"not zlib")
    assert not gztable.decompresses_right(stream, point, zlib.compress(bytes(40000)))  # more than a window
    shifted = gztable.Point(
        point.out, point.into, (point.bits + 1) % 8, point.position, point.length, point.digest
    )
    assert not gztable.decompresses_right(stream, shifted, own)
    later = gztable.Point(point.out + 1, point.into, point.bits, point.position, point.length, point.digest)
    assert not gztable.decompresses_right(stream, later, own)


def test_inflated_reads_across_members_and_says_when_the_stream_ends() -> None:
    data = random.Random(6).randbytes(MiB) + b"words " * 100_000
    stream = zlib.compress(data[:300_000], wbits=31) + zlib.compress(data[300_000:], wbits=31)

    for start in (0, 299_990, 300_000, len(data) - 4096):
        assert gztable.inflated(stream, start, 4096) == data[start : start + 4096]
    assert gztable.inflated(stream, len(data) - 10, 100) is None
    assert gztable.inflated(stream[:5000] + b"\xff" * 1000, 9000, 10) is None
