"""Sparse map mutations for the fuzzer: old GNU slots, PAX 0.0/0.1 records and PAX 1.0 maps, broken.

Each map is decoded from the archive, broken in one way by `mutate_extents` (order, overlap, bounds, huge
values, counts, the real size) or as text, and written back in its own dialect.
"""

import random

from kit import tarbuilder as tb
from kit.fuzz.layout import (
    BLOCK,
    ZERO_BLOCK,
    Layout,
    Span,
    decimal_text,
    frame,
    padded,
    pick,
    record_parts,
    replace_area,
    resign,
    split_records,
)
from tarfuse.errors import BadHeader
from tarfuse.tar.header import parse_number, parse_sparse_numbers

Extents = list[tuple[int, int]]


def mutate_extents(
    extents: Extents, real_size: int, archive_size: int, rng: random.Random
) -> tuple[Extents, int, str]:
    """Break a sparse map in one way: order, overlap, bounds, huge values, counts, or the real size."""
    out = list(extents)
    kind = rng.choice(
        [
            "swap",
            "overlap",
            "past-real",
            "past-archive",
            "huge",
            "zero",
            "drop",
            "dup",
            "length",
            "real",
            "many",
        ]
    )
    i = rng.randrange(len(out)) if out else 0
    if kind == "swap" and len(out) > 1:
        j = rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    elif kind == "overlap" and i > 0:
        previous_end = out[i - 1][0] + out[i - 1][1]
        out[i] = (previous_end - rng.randint(1, max(1, out[i - 1][1])), out[i][1])
    elif kind == "past-real" and out:
        end = out[-1][0] + out[-1][1]
        real_size = max(0, end - rng.choice([1, 2, 512, end]))
    elif kind == "past-archive" and out:
        out[i] = (out[i][0], rng.choice([archive_size, 2 * archive_size, 2**40, 2**63 - 1]))
    elif kind == "huge" and out:
        out[i] = (rng.choice([2**63 - 1, 2**63, 2**64 + 5, 10**20, real_size + 1]), out[i][1])
    elif kind == "zero":
        out.insert(i, (rng.choice([0, real_size, real_size + 1]), 0))
    elif kind == "drop" and out:
        out.pop(i)
    elif kind == "dup" and out:
        out.insert(i, out[i])
    elif kind == "length" and out:
        out[i] = (out[i][0], max(0, out[i][1] + rng.choice([-4096, -1, 1, 512, 4096])))
    elif kind == "real":
        real_size = rng.choice([0, 1, real_size - 1, real_size + 1, 2**63 - 1, 2**63, 2**64, 10**20])
    else:  # "many": a long, well-formed tail of tiny extents, so that the map outgrows its blocks
        start = out[-1][0] + out[-1][1] if out else 0
        count = rng.choice([30, 300, 3000])
        out += [(start + 8 * k + 4, 1) for k in range(count)]
        real_size = max(real_size, start + 8 * count + 8)
        kind = f"{count} more extents"
    return out, real_size, kind


def _pairs(numbers: list[int]) -> Extents:
    return list(zip(numbers[0::2], numbers[1::2], strict=False))


def _slot_bytes(value: int, rng: random.Random) -> bytes:
    """A 12-byte old GNU number: octal where it fits, else (or now and then anyway) base-256."""
    value = max(-(2**87), min(value, 2**88 - 1))
    if value < 0 or rng.random() < 0.1:
        return tb.base256(value, 12)
    return tb.number(value, 12)


def mutate_old_gnu_map(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    header = pick(rng, layout.sparse_headers)
    if header is None:
        return None
    blocks: list[int] = []
    while header + (len(blocks) + 1) * BLOCK in layout.extension_blocks:
        blocks.append(header + (len(blocks) + 1) * BLOCK)
    if rng.random() < 0.2:  # break the isextended chain itself
        last = blocks[-1] if blocks else header
        flag_at = last + (504 if blocks else 482)
        buf[flag_at] = 0 if buf[flag_at] and rng.random() < 0.5 else 1
        return f"old GNU isextended at {flag_at} := {buf[flag_at]}" + resign(buf, header, rng)
    slots = [header + 386 + 24 * k for k in range(4)] + [b + 24 * k for b in blocks for k in range(21)]
    try:
        numbers = parse_sparse_numbers(bytes(buf[header + 386 : header + 482]), 4)
        for b in blocks:
            numbers += parse_sparse_numbers(bytes(buf[b : b + BLOCK]), 21)
        real_size = parse_number(bytes(buf[header + 483 : header + 495]))
    except BadHeader:
        return None
    extents, real_size, kind = mutate_extents(_pairs(numbers), real_size, len(buf), rng)
    added = 0
    while len(extents) > len(slots):  # more extension blocks, inserted before the data
        at = (blocks[-1] if blocks else header) + BLOCK
        buf[(blocks[-1] + 504) if blocks else (header + 482)] = 1
        buf[at:at] = ZERO_BLOCK
        blocks.append(at)
        slots += [at + 24 * k for k in range(21)]
        added += 1
    for k, slot in enumerate(slots):
        raw = (
            _slot_bytes(extents[k][0], rng) + _slot_bytes(extents[k][1], rng)
            if k < len(extents)
            else bytes(24)
        )
        buf[slot : slot + 24] = raw
    buf[header + 483 : header + 495] = _slot_bytes(real_size, rng)
    grown = f", {added} extension blocks added" if added else ""
    return f"old GNU map of header {header}: {kind}{grown}" + resign(buf, header, rng)


_SPARSE_KEYS = {"GNU.sparse.offset", "GNU.sparse.numbytes", "GNU.sparse.map", "GNU.sparse.numblocks"}


def mutate_pax0_map(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    spans = tuple(s for s in layout.pax if b"GNU.sparse.numblocks=" in buf[s.offset : s.offset + s.size])
    span = pick(rng, spans)
    if span is None:
        return None
    assert isinstance(span, Span)
    records, rest = split_records(bytes(buf[span.offset : span.offset + span.size]))
    parts = [record_parts(r) for r in records]
    values = [v for k, v in parts if k in ("GNU.sparse.offset", "GNU.sparse.numbytes")]
    version = "0.0" if values else "0.1"
    if not values:
        values = next((v for k, v in reversed(parts) if k == "GNU.sparse.map"), b"").split(b",")
    sizes = [v for k, v in parts if k == "GNU.sparse.size"]
    try:
        numbers = [int(v) for v in values if v]
        real_size = int(sizes[-1]) if sizes else 0
    except ValueError:
        return None
    extents, real_size, kind = mutate_extents(_pairs(numbers), real_size, len(buf), rng)
    texts = [str(n) for extent in extents for n in extent]
    if texts and rng.random() < 0.15:
        texts[rng.randrange(len(texts))] = decimal_text(rng, len(buf))
        kind += ", a value garbled"
    count = str(len(extents)) if rng.random() < 0.8 else decimal_text(rng, len(buf))
    sparse = [frame("GNU.sparse.numblocks", count)]
    if version == "0.1":
        sparse.append(frame("GNU.sparse.map", ",".join(texts)))
    else:
        keys = ["GNU.sparse.offset", "GNU.sparse.numbytes"]
        sparse += [frame(keys[k % 2], text) for k, text in enumerate(texts)]
    others = [
        r
        for r, (k, _) in zip(records, parts, strict=True)
        if k not in _SPARSE_KEYS and k != "GNU.sparse.size"
    ]
    new = b"".join([frame("GNU.sparse.size", str(real_size)), *others, *sparse]) + rest
    return f"PAX {version} map at {span.offset}: {kind}" + replace_area(buf, span, span.size, new, rng)


def mutate_pax10_map(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    span = pick(rng, layout.maps)
    if span is None:
        return None
    assert isinstance(span, Span)
    member = next(d for d in layout.data if d.offset == span.offset)
    text = bytes(buf[span.offset : span.offset + span.size])
    old_map_size = min(padded(span.size), member.size)
    real_size = None
    if rng.random() < 0.35:
        new, kind = _garble_map_text(text, rng)
    else:
        numbers = [int(line) for line in text.split(b"\n")[1:] if line.isdigit()]
        extents, real_size, kind = mutate_extents(_pairs(numbers), -1, len(buf), rng)
        count = str(len(extents)).encode() if rng.random() < 0.8 else rng.choice([b"99999999999", b"0", b"1"])
        new = b"\n".join([count, *(b"%d" % n for extent in extents for n in extent)]) + b"\n"
    new = tb.pad(new) if rng.random() < 0.9 else new  # the map normally ends on a block boundary
    done = f"PAX 1.0 map at {span.offset}: {kind}" + replace_area(buf, member, old_map_size, new, rng)
    pax = next((p for p in layout.pax if p.offset + padded(p.size) == member.header), None)
    if real_size is not None and real_size >= 0 and pax is not None:  # the map's PAX header, before it
        records, rest = split_records(bytes(buf[pax.offset : pax.offset + pax.size]))
        records = [r for r in records if record_parts(r)[0] != "GNU.sparse.realsize"]
        records.append(frame("GNU.sparse.realsize", str(real_size)))
        done += (
            ", realsize := "
            + str(real_size)
            + replace_area(buf, pax, pax.size, b"".join(records) + rest, rng)
        )
    return done


def _garble_map_text(text: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["cut", "no-newline", "count", "blank", "spaces", "letters", "zeros"])
    if kind == "cut":
        return text[: rng.randrange(len(text) + 1)], "map cut mid-line"
    if kind == "no-newline":
        return text.rstrip(b"\n"), "last newline removed"
    if kind == "count":
        first, _, rest = text.partition(b"\n")
        more = b"%d" % (int(first) + 1) if first.isdigit() else b"1"
        count = rng.choice([b"99999999999", b"9" * 25, b"-1", b"", b"x", more])
        return count + b"\n" + rest, f"count := {count!r}"
    lines = text.split(b"\n")
    i = rng.randrange(len(lines))
    lines[i] = {
        "blank": b"",
        "spaces": b" " + lines[i] + b" ",
        "letters": b"12a",
        "zeros": b"0" * 40 + lines[i],
    }[kind]
    return b"\n".join(lines), f"line {i}: {kind}"


def mutate_sparse(buf: bytearray, layout: Layout, rng: random.Random) -> str | None:
    """Break whichever sparse map the archive has (old GNU, PAX 0.0/0.1, PAX 1.0)."""
    choices = [mutate_old_gnu_map, mutate_pax0_map, mutate_pax10_map]
    rng.shuffle(choices)
    for mutation in choices:
        if (done := mutation(buf, layout, rng)) is not None:
            return done
    return None
