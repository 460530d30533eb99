"""`tarfuse --index-only ARCHIVE -o index=PATH`: the index a mount would make, made once and written where
the admin says, to publish beside the object (`<object>.tarfuse-index`) for every host that mounts it.

The index is the one the background pass of a mount makes (passes.IndexingPass): the decompressed size,
the decoder's seek points and, for a tar, its member list (tar/listing.py), bound to the archive's size,
its ETag if it has one and a digest of its two ends (index.portable_binding), so that an index made from
a local copy fits the object uploaded from it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import cast

from tarfuse.errors import ArchiveError, UsageError
from tarfuse.image.bare import TAR_HEAD, is_tar
from tarfuse.mount import open_source
from tarfuse.options import MountOptions
from tarfuse.printable import printable
from tarfuse.sources import sidefiles
from tarfuse.sources.file import Background

_PROGRESS_EVERY = 1.0  # seconds between progress lines

Say = Callable[[str], None]


def make_index(path: str, options: MountOptions, progress: Say) -> tuple[str, int]:
    """Decompress ARCHIVE once and write its index to -o index=PATH; return PATH and the index's length.

    `progress` hears the pass's progress line every second. Raises UsageError without -o index= or for
    an archive that needs no index, ArchiveError if the pass fails or no index could be written.
    """
    from tarfuse.passes import IndexingPass
    from tarfuse.sources.compressed import CompressedSource

    if options.index is None:
        raise UsageError("--index-only needs -o index=PATH: where to write the index")
    _check_destination(options.index)  # before the pass, which may take long
    with contextlib.closing(open_source(path, options)) as source:
        if source.background is not Background.INDEX:
            raise UsageError(
                f"{source.path} needs no index: a mount reads it in place "
                f"({source.compression or 'not compressed'}, with random access)"
            )
        tar = is_tar(source.read_at(0, TAR_HEAD))  # its members go into the index too
        indexing = IndexingPass(cast(CompressedSource, source), "", options.index, tar, spill_max=0)
        worker = threading.Thread(target=indexing.run, args=(threading.Event(),), name="tarfuse-index")
        worker.start()
        while worker.is_alive():
            worker.join(_PROGRESS_EVERY)
            if worker.is_alive():
                progress(indexing.status())
        if indexing.state != "done":
            raise ArchiveError(f"no index made: {indexing.state.removeprefix('failed: ')}", None)
        if indexing.index_saved is None:
            raise ArchiveError(
                f"no index written to {options.index} (see above; a stream of one zstd frame or one xz "
                "block has no seek points to publish: recompress it with several, e.g. zstd -T0 "
                "--block-size or xz -T0)",
                None,
            )
        return options.index, indexing.index_saved


def _check_destination(path: str) -> None:
    """Refuse, before any work, a -o index= whose directory someone else could change: written as root,
    the file could be swapped for a link to one of root's between the check and the write."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        sidefiles.make_directory(directory)
    except OSError as exc:
        raise UsageError(
            f"-o index={printable(path)}: cannot write there: {exc.strerror or exc}"
            " (choose a directory that only you, or root, can change)"
        ) from None
