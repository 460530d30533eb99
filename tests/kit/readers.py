"""Readers that keep a mounted image busy: random reads, each checked against the image's own bytes.

Used in threads (`read_until`) and, run as a script, in processes:

    python readers.py IMAGE ORACLE STOP_FILE READY_FILE SEED [--reopen]

reads IMAGE until STOP_FILE exists or a read fails, then prints its tally as JSON on stdout. It creates
READY_FILE after its first read, so that a test knows the reader is in flight.
"""

import errno
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

READ_SIZES = (512, 4096, 65_536, 300_000, 1 << 20)
REOPEN_PAUSE = 0.01  # seconds between a close and the next open, with --reopen


@dataclass
class Tally:
    """What one reader saw. `wrong` must stay 0; `errors` holds errno names (a reader stops at the first).

    A short read returns fewer bytes than the image has there, but the right ones.
    """

    reads: int = 0
    wrong: int = 0
    short: int = 0
    errors: list[str] = field(default_factory=list)
    first_wrong: str = ""


def read_until(
    image: str, oracle: bytes, stop: Callable[[], bool], ready: str, seed: int, reopen: bool = False
) -> Tally:
    """Read random ranges of `image` until `stop()` or a failed open or read; create `ready` after the first.

    With `reopen`, every read has its own open and close and a pause after it (a client that opens the
    image per request), so there are moments when no reader has it open and an unmount can succeed.
    """
    rng, tally, fd = random.Random(seed), Tally(), None
    try:
        while not stop():
            if fd is None:
                fd = os.open(image, os.O_RDONLY)
            size = rng.choice(READ_SIZES)
            offset = rng.randrange(len(oracle))
            got = os.pread(fd, size, offset)
            if reopen:
                os.close(fd)
                fd = None
            tally.reads += 1
            if tally.reads == 1:
                open(ready, "x").close()
            expected = oracle[offset : offset + size]
            if got != expected[: len(got)]:
                tally.wrong += 1
                tally.first_wrong = tally.first_wrong or f"pread({size}, {offset}) -> {len(got)} bytes"
            elif len(got) < len(expected):
                tally.short += 1
            if reopen:
                time.sleep(REOPEN_PAUSE)
    except OSError as exc:
        tally.errors.append(errno.errorcode.get(exc.errno or 0, str(exc)))
    finally:
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:  # closing after the daemon is gone may fail; the tally says so
                tally.errors.append(errno.errorcode.get(exc.errno or 0, str(exc)))
    return tally


def main(image: str, oracle_path: str, stop_file: str, ready: str, seed: str, *flags: str) -> None:
    with open(oracle_path, "rb") as oracle:
        data = oracle.read()
    tally = read_until(image, data, lambda: os.path.exists(stop_file), ready, int(seed), "--reopen" in flags)
    print(json.dumps(asdict(tally)))


if __name__ == "__main__":
    main(*sys.argv[1:])
