"""What a mount does in the background for a source, and what it waits for before it serves.

A source says what it needs (file.Background): nothing, a check of the whole stream (dictzip), or the
indexing pass of a compressed stream (passes.py), whose seek index goes where the source's `index_home`
allows (index.default_path) unless -o index= or -o noindex says otherwise. A stream served as one image
must know its size before the first stat; where only its end tells, the mount waits for the pass here.
The passes and the index are imported where a source needs them: a plain mount does not pay for them
(tests/test_imports.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from tarfuse.errors import CorruptCompressed
from tarfuse.image.open import Image, open_first_image
from tarfuse.options import MountOptions
from tarfuse.served import BackgroundJob
from tarfuse.sources.file import Background, ByteSource, IndexHome
from tarfuse.tar.files import Candidate

if TYPE_CHECKING:
    from tarfuse.passes import IndexingPass, VerifyPass
    from tarfuse.sources.compressed import CompressedSource
    from tarfuse.sources.dictzip import DictzipSource
    from tarfuse.sources.index import Published

_PROGRESS_EVERY = 5.0  # seconds between progress lines while a stream is decompressed for its size

Say = Callable[[str], None]
Replace = Callable[[Candidate], bool]  # contents.LaterCopy.replace: serve a later member of the same name


def index_path(source: ByteSource, options: MountOptions) -> str | None:
    """Where the seek index of `source` is kept; None: nowhere (-o noindex, or no safe place)."""
    if options.noindex or source.background is not Background.INDEX:
        return None
    from tarfuse.sources import index

    if options.index is not None and source.index_home is not IndexHome.INNER:
        return options.index  # the archive's: a compressed member's goes to the cache, keyed by identity
    beside = source.index_home is IndexHome.BESIDE  # a URL's index goes to the cache, never "beside" it
    return index.default_path(source.path, source.identity(), beside)


def with_saved_index(source: CompressedSource, options: MountOptions) -> str | None:
    """Where the index of `source` is kept, once a saved one there is loaded if the source still needs it
    (it gives the size, or serves from the spill) after a published one (published_index); None: nowhere."""
    from tarfuse.sources import index

    where = index_path(source, options)
    if where is not None:  # in the cache directory: hold its entry there, and keep the directory bounded
        index.keep_cache_bounded(where, source, options.cache_max)
    # A published index was looked for first (published_index, before the archive's first read).
    if (not source.size_known or source.needs_spill()) and where is not None:
        index.use_saved_index(where, source)
    return where


def published_index(source: ByteSource) -> Published | None:
    """Load a remote compressed archive's published index, if it has one that fits (use_published)."""
    if source.background is not Background.INDEX or source.size_known:
        return None
    return _published(_indexed(source))


def _published(source: CompressedSource) -> Published | None:
    """A remote archive's published index (`<object>.tarfuse-index`), looked for before the local one:
    the first mount of every host then needs no pass (nor, with the member list it carries, the walk of
    the tar's headers)."""
    if source.index_home is not IndexHome.CACHE or source.needs_spill():
        return None  # a local file's index beside it is a side file (index.default_path); a member has none
    from tarfuse.sources import index

    return index.use_published(source)


def saved_index(source: ByteSource, options: MountOptions) -> str | None:
    """For --list: the saved index a mount of `source` would use, if there is one it can use, after a
    published one (published_index)."""
    if source.background is not Background.INDEX:
        return None
    where = index_path(source, options)
    if where is None:
        return None
    from tarfuse.sources import index

    return where if index.use_saved_index(where, _indexed(source)) else None


def headers_at_hand(source: ByteSource) -> bool:
    """Whether every tar header of `source` is cheap to reach: a plain archive, dictzip, or a compressed
    one with a complete index (xz's, seekable zstd's, a saved one) and random access (no spill needed)."""
    if source.background is not Background.INDEX:
        return True
    indexed = _indexed(source)
    return indexed.size_known and not indexed.needs_spill()


def open_in_stream(
    source: ByteSource, options: MountOptions, where: str | None, replace: Replace | None = None
) -> tuple[Image, BackgroundJob | None]:
    """Open the image of a tar whose headers are not at hand (headers_at_hand): as soon as the headers
    before it are decompressed, with one pass in the background for everything else. `where`: the
    index's place (with_saved_index); `replace`: what lets the pass serve a later member of the image's
    name instead, while nothing of the first was read.

    The pass reads every header on its way (other candidates are logged, a later member of the served
    name is found) and, for a stream with no restart point but its start (one zstd frame, one xz block),
    copies it into the spill as it goes: one pass for both, never a scan before the mount and a second
    decompression after it. With a complete index (a saved one, or a seekable zstd's) and random
    access, headers_at_hand is true and nothing of this is needed.
    """
    from tarfuse.passes import IndexingPass

    indexed = _indexed(source)
    image = open_first_image(source.read_at, source.size, options.member, source.pread_into)
    indexing = IndexingPass(
        indexed,
        image.name,
        where,
        scan=True,
        served_header=image.member.header_offset,
        replace=replace,
        spill_max=options.spill_max,
    )
    indexing.announce()
    return image, _job(indexing)


def whole_stream_ready(source: ByteSource, options: MountOptions, say: Say) -> BackgroundJob | None:
    """Make a stream servable as one image: its exact size known, and its background job if any.

    A tar's size needs no knowing (its headers say where things end); an image's does, before the first
    stat: QEMU and losetup take st_size once. xz, seekable zstd, dictzip and a saved index give it at once.
    gzip says it only modulo 4 GiB, a one-frame zstd may not say it: then the stream is decompressed once,
    here, before the mount (timed in docs/compressed.md), and the index kept makes the next mount immediate.
    """
    if source.background is not Background.INDEX:
        return check(source)
    from tarfuse.passes import IndexingPass

    source = _indexed(source)
    where = with_saved_index(source, options)
    if source.size_known and not source.needs_spill():
        return None
    waits = not source.size_known
    indexing = IndexingPass(
        source,
        source.path,
        where,
        scan=False,
        spill_max=options.spill_max,
        max_ratio=options.max_ratio if waits else 0,
    )
    indexing.announce()
    if not waits:  # only its spill or index to make: in the background, as for a tar
        return _job(indexing)
    say(f"{source.path}: the {source.compression} stream does not say its size: decompressing it once")
    indexing.quiet = True
    waiting = threading.Thread(
        target=indexing.run, args=(threading.Event(),), name="tarfuse-size", daemon=True
    )
    waiting.start()
    while True:
        waiting.join(_PROGRESS_EVERY)
        if not waiting.is_alive():
            break
        say(indexing.status())
    source.check_unchanged()  # the pass found it corrupt
    if not source.size_known:
        raise CorruptCompressed(f"the size of the {source.compression} stream could not be learned", None)
    return None


def check(source: ByteSource) -> BackgroundJob | None:
    """The background job of a source that needs no index: a dictzip stream's CRC32, read whole once
    (passes.VerifyPass says why); none for the others."""
    if source.background is not Background.VERIFY:
        return None
    from tarfuse.passes import VerifyPass

    checking = VerifyPass(cast("DictzipSource", source))
    return _job(checking)


def _job(work: IndexingPass | VerifyPass) -> BackgroundJob:
    return BackgroundJob(work.run, work.status, lambda: work.progress.done, lambda: [work.report()])


def _indexed(source: ByteSource) -> CompressedSource:
    """A source that says it needs the indexing pass (Background.INDEX) is one the pass can read."""
    return cast("CompressedSource", source)


def one_after_another(first: BackgroundJob | None, then: BackgroundJob | None) -> BackgroundJob | None:
    """Two background jobs in one thread (the archive's pass, then its compressed member's)."""
    if first is None or then is None:
        return first or then

    def run(stop: threading.Event) -> None:
        first.run(stop)
        if not stop.is_set():
            then.run(stop)

    status = lambda: first.status() if not first.done() else then.status()  # noqa: E731
    return BackgroundJob(run, status, then.done, lambda: [*first.report(), *then.report()])
