"""What `tarfuse --list` and `tarfuse --cache` print: tables for people, JSON for scripts.

Every name that comes from an archive or a file system goes through printable(): a newline in a member's
name must not forge a row, an escape sequence must not reach the terminal.
"""

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tarfuse.image.open import Image
from tarfuse.printable import printable
from tarfuse.sources.locations import display_name

if TYPE_CHECKING:
    from tarfuse.sources import cachedir


def show_cache(directory: str, entries: "list[cachedir.Kept]", as_json: bool) -> None:
    size = sum(e.size for e in entries)
    if as_json:
        print_json({"directory": directory, "entries": [_cache_entry(e) for e in entries], "size": size})
        return
    rows = [("KIND", "SIZE", "LAST USE", "STATE", "ARCHIVE")]
    rows += [_cache_row(e) for e in entries]
    _print_columns(rows)
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    print(f"total: {count}, {bytes_and_human(size)}, in {printable(directory)}")


def show_pruned(directory: str, pruned: "cachedir.Pruned", as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "directory": directory,
                "removed": [_cache_entry(e) for e in pruned.removed],
                "stale": [{"name": name, "size": size} for name, size in pruned.stale],
                "kept": [_cache_entry(e) for e in pruned.kept],
                "freed": pruned.freed,
            }
        )
        return
    for entry in pruned.removed:
        what = "+".join(entry.kinds) or "use file"
        print(f"removed {_archive_shown(entry)} ({what}, {bytes_and_human(entry.size)})")
    for name, size in pruned.stale:
        print(f"removed {printable(name)} ({bytes_and_human(size)}), left by a tarfuse that did not finish")
    for entry in pruned.kept:
        why = "in use by a mount" if entry.in_use else "being written" if entry.writing else "not removable"
        print(f"kept {_archive_shown(entry)} ({bytes_and_human(entry.size)}): {why}")
    print(f"freed {bytes_and_human(pruned.freed)} in {printable(directory)}")


def _cache_row(entry: "cachedir.Kept") -> tuple[str, str, str, str, str]:
    state = "in use" if entry.in_use else "writing" if entry.writing else "-"
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.used))
    return ("+".join(entry.kinds) or "-", bytes_and_human(entry.size), used, state, _archive_shown(entry))


def _archive_shown(entry: "cachedir.Kept") -> str:
    if entry.archive is None:
        return f"(not recorded{': a compressed member' if entry.member else ''}; key {entry.key})"
    return printable(entry.archive) + (" (a compressed member in it)" if entry.member else "")


def _cache_entry(entry: "cachedir.Kept") -> dict[str, object]:
    """An entry for scripts: sizes in bytes, the last use in UTC (ISO 8601) and as a Unix time."""
    used = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.used))
    return {
        "key": entry.key,
        "archive": entry.archive,
        "member": entry.member,
        "kinds": list(entry.kinds),
        "size": entry.size,
        "last_used": used,
        "last_used_unix": entry.used,
        "in_use": entry.in_use,
        "writing": entry.writing,
    }


def print_json(value: object) -> None:
    import json  # only --json needs it

    print(json.dumps(value, indent=2))


def listing_json(
    path: str, compression: str | None, index: str | None, images: list[Image]
) -> dict[str, object]:
    """What --list shows, for scripts: the same fields, with their types, and the format's QEMU name apart."""
    return {
        "archive": display_name(path),
        "compression": compression,
        "index": index,
        "images": [
            {
                "path": i.name,
                "format": i.format.driver,
                "format_detail": i.format.detail,
                "size": i.mapper.size,
                "allocated": i.stored_bytes,
                "virtual_size": i.format.virtual_size,
                "extents": i.extent_count,
                "offset": i.member.data_offset,
            }
            for i in images
        ],
    }


def print_table(images: list[Image]) -> None:
    """The table --list prints: columns two spaces apart or more, sizes in bytes with a human figure."""
    rows = [("PATH", "FORMAT", "SIZE", "ALLOCATED", "VIRTUAL", "EXTENTS", "OFFSET")]
    rows += [
        (
            printable(i.name),  # a newline in a name would forge a row
            printable(str(i.format)),
            bytes_and_human(i.mapper.size),
            bytes_and_human(i.stored_bytes),
            "-" if i.format.virtual_size is None else human_size(i.format.virtual_size),
            str(i.extent_count),
            str(i.member.data_offset),
        )
        for i in images
    ]
    _print_columns(rows)


def bytes_and_human(size: int) -> str:
    """`1073741824 (1.0 GiB)`: the exact figure to paste, and one to read; below 1 KiB only the bytes."""
    return str(size) if size < 1024 else f"{size} ({human_size(size)})"


def human_size(size: int) -> str:
    """Binary units with one decimal, as `qemu-img info` and `ls -lh` show them: `512 B`, `1.5 GiB`."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} EiB"


def _print_columns(rows: Sequence[tuple[str, ...]]) -> None:
    """Rows as columns two spaces apart or more, as `ps` and `df` print them; parsers split on two spaces."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def print_status(mountpoint: str, status: dict[str, Any]) -> None:
    """tarfuse --status, for people: the archive, the files served, each background pass, the bytes
    fetched. `status` is what the daemon answered (mount.Assembly.status): its strings are escaped here."""
    compression = status.get("compression")
    print(f"{printable(mountpoint)}: {printable(str(status.get('archive')))}", end="")
    print(f", {printable(str(compression))}-compressed" if compression else "")
    rows = [(printable(str(f.get("name"))), bytes_and_human(int(f.get("size", 0)))) for f in status["files"]]
    _print_columns([("  FILE", "SIZE"), *((f"  {name}", size) for name, size in rows)])
    if (more := int(status.get("file_count", 0)) - len(rows)) > 0:
        print(f"  ... and {more} more")
    for job in status.get("passes", []):
        print(_pass_line(job))
        for key in ("index", "spill"):
            if job.get(key) is not None:
                size = job.get(f"{key}_size")
                told = "not written yet" if size is None else bytes_and_human(int(size))
                print(f"  {key}: {printable(str(job[key]))}, {told}")
    if (fetched := status.get("fetched_bytes")) is not None:
        print(f"fetched: {bytes_and_human(int(fetched))} over http(s)")
    if (listed := status.get("read_list")) is not None:
        print(f"read list: {printable(str(listed))}")


def _pass_line(job: dict[str, Any]) -> str:
    """One background pass: while it runs, the progress line it logs (how far, rate, time left); then its
    state."""
    state = printable(str(job.get("state")))
    if state == "running" and job.get("progress"):
        return printable(str(job["progress"]))
    return f"{printable(str(job.get('job')))}: {state}"
