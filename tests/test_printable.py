"""Names from an archive reach terminals and logs escaped (tarfuse/printable.py): a newline cannot forge a
row of `--list` or a log line, an ESC sequence cannot hide text or set the terminal's title, and bytes that
are not UTF-8 are shown, not crashed on. The helper alone first, then the places that print names, run for
real: `tarfuse --list`, the error of a file mount point, a daemon's log."""

import io
import json
import logging
import logging.handlers
import os
import re
import subprocess
import sys
import tarfile
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kit.mounts import MountFactory, tarfuse_command

from tarfuse.printable import PrintableFormatter, printable, terminal_safe
from tarfuse.serve import daemon

C0 = [chr(code) for code in range(0x20)]
C1 = [chr(code) for code in range(0x80, 0xA0)]
BIDI = ["\u061c", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))]
# Names an archive's author could choose: a forged --list row, hidden text, a forged log line that also
# sets the terminal's title, bytes that are not UTF-8 (decoded with surrogateescape, as the tar reader
# does), and C1 controls (0x9b is an 8-bit CSI).
HOSTILE = [
    "a.img\nvendor-signed.qcow2",
    "\x1b[8mhidden.img",
    "x\ntarfuse: \x1b]0;title\x07index complete.img",
    "caf\udce9\udcff.img",
    "c1\x85\x9b.img",
]
ALLOWED_RAW = {"\n"}  # the end of each line


def raw_controls(text: str) -> set[str]:
    """The characters in `text` that a terminal or a log reader would act on."""
    return {
        c for c in text if unicodedata.category(c) in ("Cc", "Cs") or c in BIDI or c in "\u2028\u2029"
    } - ALLOWED_RAW


def unescape(shown: str) -> bytes:
    """Undo printable() on the bytes of a name: the escapes must say exactly what was there."""
    out = bytearray()
    parts = iter(re.split(r"(\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|.))", shown))
    for text in parts:
        out += text.encode("utf-8", "surrogateescape")
        escape = next(parts, None)
        if escape is None:
            break
        if escape[1] == "x":
            code = int(escape[2:], 16)
            out += bytes([code]) if code >= 0x80 else chr(code).encode()
        elif escape[1] == "u":
            out += chr(int(escape[2:], 16)).encode("utf-8", "surrogatepass")
        else:
            out += {"n": b"\n", "r": b"\r", "t": b"\t", "\\": b"\\"}[escape[1]]
    return bytes(out)


# The helper ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("char", [*C0, "\x7f"], ids=lambda c: f"{ord(c):#04x}")
def test_every_c0_control_and_del_is_escaped(char: str) -> None:
    short = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    escape = short.get(char, "\\x" + format(ord(char), "02x"))
    assert printable(f"a{char}b") == f"a{escape}b"


@pytest.mark.parametrize("char", C1, ids=lambda c: f"{ord(c):#04x}")
def test_every_c1_control_is_escaped_apart_from_an_invalid_byte(char: str) -> None:
    assert printable(char) == f"\\u{ord(char):04x}"
    assert printable(char) != printable(bytes([ord(char)]))  # the character U+0085 is not the byte 0x85


def test_esc_sequences_are_shown_not_run() -> None:
    assert printable("\x1b[8mhidden") == "\\x1b[8mhidden"
    assert printable("\x1b]0;title\x07") == "\\x1b]0;title\\x07"
    assert printable("\x9b31m") == "\\u009b31m"  # CSI in its 8-bit form


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (b"caf\xe9.img", "caf\\xe9.img"),  # latin-1
        (b"\xff\xfe", "\\xff\\xfe"),
        (b"\xc0\xaf", "\\xc0\\xaf"),  # an overlong '/'
        (b"\xe6\x97", "\\xe6\\x97"),  # a character cut short
        (b"\xed\xa0\x80", "\\xed\\xa0\\x80"),  # an encoded surrogate
    ],
)
def test_invalid_utf8_is_escaped_byte_by_byte_from_bytes_or_surrogateescape(name: bytes, shown: str) -> None:
    assert printable(name) == shown
    assert printable(os.fsdecode(name)) == shown


def test_a_backslash_is_escaped_so_a_name_cannot_pass_for_an_escape() -> None:
    assert printable("a\\b") == "a\\\\b"
    assert printable("\\x1b[8m") != printable("\x1b[8m")


@pytest.mark.parametrize("char", BIDI, ids=lambda c: f"U+{ord(c):04X}")
def test_characters_that_reorder_text_are_escaped(char: str) -> None:
    assert printable(f"gpj.{char}exe") == f"gpj.\\u{ord(char):04x}exe"


@pytest.mark.parametrize(
    "name", ["disk.img", "é.qcow2", "日本/ディスク.img", "Ærøskøbing ß", "🙂.vmdk", "e\u0301"]
)
def test_plain_names_stay_as_they_are(name: str) -> None:
    assert printable(name) == name
    assert printable(name.encode()) == name


@given(st.binary(max_size=64))
def test_the_escapes_say_exactly_which_bytes_the_name_has(name: bytes) -> None:
    shown = printable(name)
    assert not raw_controls(shown)
    assert unescape(shown) == name


@given(st.text(st.characters(exclude_categories=()), max_size=32))
def test_no_character_of_any_name_reaches_the_terminal_raw(name: str) -> None:
    assert not raw_controls(printable(name) + terminal_safe(name))


def test_terminal_safe_keeps_backslashes_and_escapes_controls() -> None:
    assert terminal_safe("C:\\x\n\x1b") == "C:\\x\\n\\x1b"
    shown = printable("a\\b")
    assert terminal_safe(f"holds {shown}") == "holds a\\\\b"  # not doubled again


def test_the_log_formatter_escapes_the_message_and_keeps_a_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "left out: %s", (HOSTILE[2],), sys.exc_info()
        )
    line = PrintableFormatter("tarfuse: %(message)s").format(record)
    message, _, traceback = line.partition("\n")
    assert message == "tarfuse: left out: x\\ntarfuse: \\x1b]0;title\\x07index complete.img"
    assert traceback.startswith("Traceback")


def test_the_detached_daemon_logs_to_syslog_without_raw_control_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = io.StringIO()

    class Syslog(logging.StreamHandler[io.StringIO]):  # what _log_to_syslog makes, writing here instead
        def __init__(self, address: str) -> None:
            super().__init__(lines)

    exists = os.path.exists
    monkeypatch.setattr(logging.handlers, "SysLogHandler", Syslog)
    monkeypatch.setattr(daemon.os.path, "exists", lambda path: path == "/dev/log" or exists(path))
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        daemon._log_to_syslog()
        logging.getLogger("tarfuse.test").warning("the archive also holds %s", HOSTILE[0])
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
    assert lines.getvalue().count("\n") == 1
    assert not raw_controls(lines.getvalue())
    assert "holds a.img\\nvendor-signed.qcow2" in lines.getvalue()


# The places that print names, run for real ----------------------------------------------------------------


def hostile_archive(path: Path, links: tuple[str, ...] = ()) -> Path:
    """A tar written by Python's tarfile holding one small image under each hostile name (GNU format: the
    header holds the name's bytes as they are, invalid UTF-8 included), and symlinks out of it."""
    with tarfile.open(
        path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for name in HOSTILE:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 4096, 1_700_000_000
            tar.addfile(info, io.BytesIO(bytes(4096)))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
            tar.addfile(info)
    return path


def run_tarfuse(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(tarfuse_command(*args), capture_output=True, timeout=120, check=False)


def test_list_shows_one_row_per_member_and_no_raw_control_character(tmp_path: Path) -> None:
    listed = run_tarfuse("--list", hostile_archive(tmp_path / "vm.tar"))
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout.decode("utf-8")  # strict: no byte that is not UTF-8 reached stdout
    assert not raw_controls(out)
    rows = out.splitlines()
    assert len(rows) == 1 + len(HOSTILE)  # the header and one row per image: none forged
    assert sorted(row.split("  ")[0] for row in rows[1:]) == sorted(map(printable, HOSTILE))


def test_list_json_carries_names_that_are_not_utf8(tmp_path: Path) -> None:
    listed = run_tarfuse("--list", "--json", hostile_archive(tmp_path / "vm.tar"))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.isascii()  # json.dumps escapes every control character and surrogate
    paths = [image["path"] for image in json.loads(listed.stdout)["images"]]
    assert sorted(map(os.fsencode, paths)) == sorted(os.fsencode(name) for name in HOSTILE)


def test_the_holds_several_images_error_is_one_line_with_the_names_escaped(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.write_bytes(b"")
    refused = run_tarfuse(hostile_archive(tmp_path / "vm.tar"), served)
    assert refused.returncode == 1
    err = refused.stderr.decode("utf-8")
    assert not raw_controls(err)
    assert err.count("\n") == 1
    assert f"holds {len(HOSTILE)} disk images (" in err
    assert all(printable(name) in err for name in HOSTILE)


@pytest.mark.fuse
def test_the_daemon_log_names_members_and_links_escaped(tmp_path: Path, mount: MountFactory) -> None:
    link = "\x1b]0;title\x07out\ntarfuse: forged"
    archive = hostile_archive(tmp_path / "vm.tar", links=(link,))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    running = mount(archive, mountpoint, "-o", "all", "--debug")
    assert sorted(os.listdir(os.fsencode(mountpoint))) == sorted(os.fsencode(name) for name in HOSTILE)
    log = running.stderr.read_bytes().decode("utf-8")
    assert not raw_controls(log)
    assert all(line.startswith("tarfuse: ") for line in log.splitlines())  # no line forged
    assert printable(link) in log  # left out, and said so
    assert all(printable(name) in log for name in HOSTILE)  # "serving NAME" at --debug
