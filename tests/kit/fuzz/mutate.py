"""Mutate tar archives the way a bad disk, a buggy writer or an attacker would: the fuzzer's input side.

Each mutation picks a place from the structure that layout.walk found (a header, a field, a PAX record,
a long name, a boundary to cut at) and breaks it in one way, returning a description for the report;
maps.py breaks sparse maps. Two add members that real archives have and readers disagree on: more members
named like the image (`tar -r`), and link, device, directory, FIFO, contiguous and dumpdir headers with a
size. `mutate` chains one to four mutations, each on the structure left by the one before. Everything is
deterministic given the `random.Random` passed in.
"""

import random
from collections.abc import Callable

from kit import sparsegen
from kit import tarbuilder as tb
from kit.fuzz.layout import (
    BLOCK,
    ZERO_BLOCK,
    Entry,
    Layout,
    Span,
    decimal_text,
    fit,
    frame,
    number_field,
    padded,
    pick,
    record_parts,
    replace_area,
    resign,
    split_records,
    walk,
)
from kit.fuzz.maps import mutate_sparse

# ---- header-level mutations ---------------------------------------------------------------------------

_FIELDS = {
    "mode": (100, 8),
    "uid": (108, 8),
    "gid": (116, 8),
    "size": (124, 12),
    "size ": (124, 12),  # listed twice: the field that matters most
    "mtime": (136, 12),
    "chksum": (148, 8),
    "devmajor": (329, 8),
    "devminor": (337, 8),
}
_OLD_GNU_FIELDS = {"realsize": (483, 12), "slot offset": (386, 12), "slot numbytes": (398, 12)}
_TYPEFLAGS = b"0\x001234567LKxgXSMVNADIZ"


def flip_bits(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    blocks = layout.headers + layout.extension_blocks
    if not blocks:
        return None
    block = rng.choice(blocks)
    positions = sorted(block + rng.randrange(BLOCK) for _ in range(rng.randint(1, 4)))
    for pos in positions:
        buf[pos] ^= 1 << rng.randrange(8)
    note = resign(buf, block, rng, 0.5) if block in layout.headers else ""
    return f"flip bits at {positions} in block {block}{note}"


def rewrite_bytes(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    header = pick(rng, layout.headers)
    if header is None:
        return None
    start = header + rng.randrange(BLOCK)
    count = min(rng.randint(1, 8), header + BLOCK - start)
    palette = b"\x00 07/8\x80\xff\n=.x"
    raw = bytes(rng.choice(palette) if rng.random() < 0.7 else rng.randrange(256) for _ in range(count))
    buf[start : start + count] = raw
    return f"bytes {raw!r} at {start} in header {header}" + resign(buf, header, rng, 0.7)


def rewrite_number(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    header = pick(rng, layout.headers)
    if header is None:
        return None
    fields = dict(_FIELDS)
    if header in layout.sparse_headers:
        fields.update(_OLD_GNU_FIELDS)
        slot = rng.randrange(4) * 24
        fields["slot offset"] = (386 + slot, 12)
        fields["slot numbytes"] = (398 + slot, 12)
    name = rng.choice(sorted(fields))
    where, width = fields[name]
    raw, what = number_field(width, rng, len(buf))
    buf[header + where : header + where + width] = raw
    note = "" if name == "chksum" else resign(buf, header, rng)
    return f"{name.strip()} of header {header} := {what}{note}"


def rewrite_typeflag(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    header = pick(rng, layout.headers)
    if header is None:
        return None
    flag = rng.choice(_TYPEFLAGS) if rng.random() < 0.9 else rng.randrange(256)
    buf[header + 156] = flag
    return f"typeflag of header {header} := {bytes([flag])!r}" + resign(buf, header, rng, 0.9)


def rewrite_magic(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    header = pick(rng, layout.headers)
    if header is None:
        return None
    magic = rng.choice([tb.GNU, tb.USTAR, tb.V7, b"ustar\0\0\0", b"ustar 00", b"USTAR\x0000"])
    buf[header + 257 : header + 265] = magic
    return f"magic of header {header} := {magic!r}" + resign(buf, header, rng, 0.9)


_NAMES = [
    b"vm/other.img",
    b"vm/disk.img",
    b"../../escape.img",
    b"/absolute.img",
    b"./vm/disk.img",
    b"vm/\xff\xfe.img",
    b"",
    b"x" * 100,
    b"vm/disk.img/",
    b"vm/disk.hardlink",
    b"a\0b.img",
]


def rewrite_name(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    header = pick(rng, layout.headers)
    if header is None:
        return None
    where, width, field = rng.choice(
        [(0, 100, "name"), (0, 100, "name"), (157, 100, "linkname"), (345, 155, "prefix")]
    )
    raw = rng.choice(_NAMES)
    buf[header + where : header + where + width] = fit(raw, width)
    return f"{field} of header {header} := {raw!r}" + resign(buf, header, rng, 0.95)


# ---- PAX records ----------------------------------------------------------------------------------


_INTERESTING_RECORDS: list[tuple[str, Callable[[random.Random, int], str]]] = [
    ("size", decimal_text),
    ("path", lambda rng, _: rng.choice(["vm/other.img", "vm/disk.img", "", "/x.img", "../x.img"])),
    ("linkpath", lambda rng, _: rng.choice(["vm/disk.img", "", "nowhere"])),
    ("mtime", lambda rng, n: rng.choice(["-1.5", "1.5", "1.", ".5", "--1", "1.x", decimal_text(rng, n)])),
    ("GNU.sparse.major", lambda rng, _: rng.choice(["1", "0", "2", "", "01"])),
    ("GNU.sparse.minor", lambda rng, _: rng.choice(["0", "1", "2", ""])),
    ("GNU.sparse.realsize", decimal_text),
    ("GNU.sparse.size", decimal_text),
    ("GNU.sparse.numblocks", decimal_text),
    ("GNU.sparse.offset", decimal_text),
    ("GNU.sparse.numbytes", decimal_text),
    (
        "GNU.sparse.map",
        lambda rng, n: ",".join(decimal_text(rng, n) for _ in range(rng.choice([0, 1, 2, 4]))),
    ),
    ("GNU.sparse.name", lambda rng, _: rng.choice(["vm/disk.img", "vm/other.img", ""])),
    ("hdrcharset", lambda rng, _: "BINARY"),
    ("uid", decimal_text),
    ("comment", lambda rng, _: rng.choice(["a\nb", "x" * 600, "=", "\0"])),
]


def _interesting_record(rng: random.Random, archive_size: int) -> bytes:
    key, value = rng.choice(_INTERESTING_RECORDS)
    return frame(key, value(rng, archive_size))


def mutate_pax(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    span = pick(rng, layout.pax)
    if span is None:
        return None
    assert isinstance(span, Span)
    payload = bytes(buf[span.offset : span.offset + span.size])
    records, rest = split_records(payload)
    i = rng.randrange(len(records) + 1)
    kind = rng.choice(
        ["length", "huge", "repeat", "no-equals", "truncate", "insert", "insert", "delete", "value", "nul"]
    )
    if kind == "length" and records:
        i = min(i, len(records) - 1)
        digits = rng.choice([b"0", b"1", b"99999999999", b"18446744073709551616", b"", b"-5", b" 12", b"1e2"])
        if rng.random() < 0.5:
            digits = b"%d" % (int(records[i].split(b" ", 1)[0]) + rng.choice([-2, -1, 1, 2, 10, 512]))
        records[i] = digits + b" " + records[i].split(b" ", 1)[1]
        what = f"record {i} length := {digits!r}"
    elif kind == "huge":
        records.insert(
            i, rng.choice([b"99999999999 path=x\n", b"9" * 30 + b" size=1\n", b"10000000000 size=1\n"])
        )
        what = f"huge-length record inserted at {i}"
    elif kind == "repeat" and records:
        j = rng.randrange(len(records))
        key, _ = record_parts(records[j])
        again = records[j] if rng.random() < 0.5 else frame(key, decimal_text(rng, len(buf)))
        records.insert(i, again)
        what = f"record {j} ({key}) repeated at {i}"
    elif kind == "no-equals" and records:
        i = min(i, len(records) - 1)
        records[i] = records[i].replace(b"=", rng.choice([b" ", b":", b""]), 1)
        what = f"'=' removed from record {i}"
    elif kind == "truncate" and payload:
        cut = rng.randrange(len(payload))
        records, rest = [payload[:cut]], b""
        what = f"payload cut at {cut}"
    elif kind == "delete" and records:
        i = min(i, len(records) - 1)
        what = f"record {i} ({record_parts(records.pop(i))[0]}) deleted"
    elif kind == "value" and records:
        i = min(i, len(records) - 1)
        key, _ = record_parts(records[i])
        records[i] = frame(key, decimal_text(rng, len(buf)))
        what = f"record {i} ({key}) value replaced"
    elif kind == "nul" and records:
        i = min(i, len(records) - 1)
        pos = rng.randrange(len(records[i]))
        records[i] = records[i][:pos] + b"\0" + records[i][pos + 1 :]
        what = f"NUL at {pos} of record {i}"
    else:
        record = _interesting_record(rng, len(buf))
        records.insert(i, record)
        what = f"record {record[:60]!r} inserted at {i}"
    new = b"".join(records) + rest
    return f"PAX payload at {span.offset}: {what}" + replace_area(buf, span, span.size, new, rng)


# ---- long names ---------------------------------------------------------------------------------------


def mutate_long_name(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    span = pick(rng, layout.long_names)
    if span is None:
        return None
    assert isinstance(span, Span)
    kind = rng.choice(["no-nul", "nul", "empty", "claim", "bytes", "image", "dotdot", "absolute", "long"])
    if kind == "claim":  # a size the archive cannot hold
        size = rng.choice([10**10, 2**40, 2**63 - 1, len(buf)])
        buf[span.header + 124 : span.header + 136] = tb.number(size, 12)
        return f"long name header {span.header} claims {size} bytes" + resign(buf, span.header, rng, 0.95)
    new = {
        "no-nul": b"d" * max(min(span.size, 4096), 1),
        "nul": b"vm/dis\0k.img\0",
        "empty": b"",
        "bytes": b"vm/\xff\xfe\x80.img\0",
        "image": b"vm/other.img\0",
        "dotdot": b"../../escape.img\0",
        "absolute": b"/absolute.img\0",
        "long": b"x" * 5000 + b".img\0",
    }[kind]
    return f"long name at {span.offset} := {kind}" + replace_area(buf, span, span.size, new, rng)


# ---- truncation and block structure -------------------------------------------------------------------


def truncate(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    points = layout.boundaries()
    if points and rng.random() < 0.75:
        offset, label = rng.choice(points)
        offset += rng.choice([0, 0, 0, -1, 1, -100, 100, 511, -511])
    else:
        offset, label = rng.randrange(len(buf) + 1), "random offset"
    offset = max(0, min(offset, len(buf)))
    del buf[offset:]
    return f"truncated at {offset} ({label})"


def rearrange_blocks(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    if not layout.headers:
        return None
    header = rng.choice(layout.headers)
    kind = rng.choice(["delete", "duplicate", "zero", "garbage", "append"])
    if kind == "delete":
        del buf[header : header + BLOCK]
    elif kind == "duplicate":
        buf[header:header] = buf[header : header + BLOCK]
    elif kind == "zero":
        buf[header:header] = ZERO_BLOCK
    elif kind == "garbage":
        buf[header:header] = rng.randbytes(BLOCK)
    else:
        buf += rng.choice([rng.randbytes(BLOCK), b"\xff" * 3000, ZERO_BLOCK * 3, b"x"])
        return "garbage appended"
    return f"{kind} block at {header}"


def rewrite_anywhere(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    if not buf:
        return None
    start = rng.randrange(len(buf))
    raw = rng.randbytes(min(rng.randint(1, 16), len(buf) - start))
    buf[start : start + len(raw)] = raw
    return f"{len(raw)} random bytes at {start}"


# ---- members that readers disagree on -------------------------------------------------------------------


def duplicate_image(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    """Add one or two more members named like the image, with other bytes, where `tar -r` appends them.

    tar -x keeps the last one; a reader that serves the first serves other bytes.
    """
    image = layout.image()
    if image is None:
        return None
    where = layout.end if layout.end is not None else len(buf)  # tar -r writes over the end blocks
    if rng.random() < 0.15:
        where = min(image.end, len(buf))
    copies = [_other_copy(buf, layout, image, rng) for _ in range(rng.choice([1, 1, 2]))]
    buf[where:where] = b"".join(member for member, _ in copies)
    what = "; ".join(note for _, note in copies)
    return f"{len(copies)} more member(s) named {image.name!r} at {where}: {what}"


def _other_copy(buf: bytearray, layout: Layout, image: Entry, rng: random.Random) -> tuple[bytes, str]:
    """The image's member again with other bytes: its own headers with stored bytes changed, or a file."""
    content = image.data.offset  # past a PAX 1.0 map, which starts the data
    if (found := next((m for m in layout.maps if m.offset == image.data.offset), None)) is not None:
        content += padded(found.size)
    content_end = image.data.offset + image.data.size
    if image.typeflag != ord("1") and content < content_end and rng.random() < 0.7:
        copy = bytearray(buf[image.start : image.end])
        positions = sorted({rng.randrange(content, content_end) for _ in range(rng.randint(1, 4))})
        for position in positions:
            copy[position - image.start] ^= rng.randrange(1, 256)
        return bytes(copy), f"its headers again, stored bytes changed at {positions}"
    size = rng.choice([0, 1, 511, 4096, 20_000, rng.randrange(70_000)])
    name = image.name.encode("utf-8", "surrogateescape")
    data = sparsegen.fill(size, rng.randrange(1 << 16))
    if len(name) > 100:
        return tb.gnu_long(name) + tb.file_member(name[:100], data, magic=tb.GNU), f"a {size}-byte file"
    return tb.file_member(name, data), f"a {size}-byte file"


_SPECIAL_NAMES = {
    ord("1"): "vm/link",
    ord("2"): "vm/symlink",
    ord("3"): "vm/char",
    ord("4"): "vm/block",
    ord("5"): "vm/dir/",
    ord("6"): "vm/fifo",
    ord("7"): "vm/contiguous",
    ord("D"): "vm/dumpdir/",
}


def sized_special(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    """Add a header of type 1-7 or D with a size and that much data, just before or after the image.

    GNU tar reads the data after types 1-6 as the next headers, and skips it after 7 and D: data that is
    itself a member named like the image tells the two readings apart.
    """
    image = layout.image()
    if image is None:
        return None
    where, place = rng.choice([(image.start, "before"), (image.end, "after"), (image.end, "after")])
    where = min(where, len(buf))
    flag = rng.choice(b"123456" * 3 + b"7D")  # 7 and D: data that every reader skips
    body, what = _special_body(image.name, place, rng)
    size = rng.choice(
        [len(body)] * 4 + [max(1, len(body) - rng.randint(1, 511)), len(body) + BLOCK, rng.randint(1, 511)]
    )
    fields = {}
    if flag in b"34":  # device numbers
        fields = {329: tb.octal(rng.randrange(256), 8), 337: tb.octal(rng.randrange(256), 8)}
    linkname = rng.choice([image.name, "vm/notes.txt", "nowhere"]) if flag in b"12" else ""
    pax, field = b"", size
    if rng.random() < 0.25:  # the size in a PAX record (bsdtar reads data for it, whatever the type)
        pax, field = tb.pax_header([("size", str(size))], name="vm/PaxHeaders/special"), rng.choice([0, size])
        what += f", the size in a PAX record (the header says {field})"
    header = tb.header(
        _SPECIAL_NAMES[flag],
        size=field,
        typeflag=bytes([flag]),
        mode=0o755 if flag in b"5D" else 0o644,
        linkname=fit(linkname.encode("utf-8", "surrogateescape"), 100).rstrip(b"\0"),
        magic=tb.USTAR if pax else rng.choice([tb.GNU, tb.USTAR]),
        fields=fields,
    )
    buf[where:where] = pax + header + tb.pad(body)
    return f"{chr(flag)!r} header of size {size} {place} the image, at {where}, over {what}"


def _special_body(image_name: str, place: str, rng: random.Random) -> tuple[bytes, str]:
    """The data after a sized special header: a member (named like the image, or not), or no member.

    After the image, a member named like it shows which reading a reader took; before it, zero blocks do
    (the end of the archive, for a reader that takes them for headers).
    """
    kinds = ["image", "member", "random", "zeros", "dumpdir"]
    kind = rng.choices(kinds, [4, 1, 1, 1, 1] if place == "after" else [1, 1, 2, 3, 1])[0]
    name = image_name.encode("utf-8", "surrogateescape")
    if kind == "image" and len(name) <= 100:
        data = sparsegen.fill(rng.choice([1, 700, 5000]), rng.randrange(1 << 16))
        return tb.file_member(name, data), f"a {len(data)}-byte member named {image_name!r}"
    if kind == "member":
        return tb.file_member("vm/inner.txt", b"read as a header\n"), "a member vm/inner.txt"
    if kind == "zeros":
        count = rng.choice([1, 2])
        return ZERO_BLOCK * count, f"{count} zero blocks"
    if kind == "dumpdir":
        return b"Ydisk.img\0Nnotes.txt\0Dsub\0\0", "a dumpdir's name list"
    data = rng.randbytes(rng.choice([1, 100, 512, 1500]))
    return data, f"{len(data)} random bytes"


Mutation = Callable[[bytearray, Layout, random.Random], str | None]
MUTATIONS: list[tuple[Mutation, int]] = [
    (flip_bits, 10),
    (rewrite_bytes, 8),
    (rewrite_number, 16),
    (rewrite_typeflag, 5),
    (rewrite_magic, 3),
    (rewrite_name, 4),
    (mutate_pax, 14),
    (mutate_sparse, 18),
    (mutate_long_name, 5),
    (truncate, 12),
    (rearrange_blocks, 5),
    (rewrite_anywhere, 2),
    (duplicate_image, 3),
    (sized_special, 4),
]
_FUNCTIONS = [m for m, _ in MUTATIONS]
_WEIGHTS = [w for _, w in MUTATIONS]


def mutate(
    data: bytes, layout: Layout, rng: random.Random, first: Mutation | None = None
) -> tuple[bytes, list[str]]:
    """Apply one to four mutations to `data` (whose structure is `layout`); return it and what was done.

    With `first`, apply that one mutation alone.
    """
    buf = bytearray(data)
    if first is not None:
        done = first(buf, layout, rng)
        return bytes(buf), [] if done is None else [done]
    steps = []
    for n in range(rng.choices([1, 2, 3, 4], [60, 25, 10, 5])[0]):
        if n:
            layout = walk(buf)
        for _ in range(10):  # a mutation that finds nothing to work on is replaced by another
            mutation = rng.choices(_FUNCTIONS, _WEIGHTS)[0]
            if (done := mutation(buf, layout, rng)) is not None:
                steps.append(done)
                break
    return bytes(buf), steps
