"""Names as they may be shown: escaped, so that a name from an archive cannot act on a terminal or a log.

A member name is whatever bytes the archive's author chose. Printed raw, a `\\n` in it forges a whole row
of `tarfuse --list` or a log line, `ESC [ 8 m` hides the text after it, `ESC ] 0 ; … BEL` sets the terminal's
title, and bytes that are not UTF-8 make `print` fail. Every place that shows a name or a path passes it
through `printable`; the log handlers (cli.py, serve/daemon.py) pass each whole line through
`terminal_safe`, in case one was missed.

Escapes (the notation of Python's string literals, so they read as what they are):
- `\\n`, `\\r`, `\\t`, and `\\xNN` for the other C0 controls and DEL (NN below 80);
- `\\xNN` for a byte that is not valid UTF-8 (NN 80 to ff: a name decoded with surrogateescape, as
  os.fsdecode and tar/header.py do);
- `\\uNNNN` for the C1 controls (U+0080 to U+009F, which some terminals act on as 8-bit ESC sequences),
  the characters that reorder text (bidi controls), line and paragraph separators, and any other lone
  surrogate;
- `\\\\` for a backslash, in `printable` only: then every escape in its output came from this function.

Everything else stays as it is: `é` and `日本` are names, not threats. This module imports nothing from
the package, so every layer can use it.
"""

import logging
import re

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# C0 and DEL, C1, the Unicode bidi controls (ALM, LRM, RLM, LRE..RLO, LRI..PDI), the line and paragraph
# separators, and every surrogate (surrogateescape puts undecodable bytes at U+DC80..U+DCFF).
_CONTROLS = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_IN_NAME = re.compile(f"[{_CONTROLS}\\\\]")
_IN_LINE = re.compile(f"[{_CONTROLS}]")


def printable(name: str | bytes) -> str:
    """Return `name` with every control character, invalid UTF-8 byte and backslash escaped.

    Bytes are decoded as UTF-8 with surrogateescape first, as os.fsdecode would.
    """
    text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
    return _IN_NAME.sub(_escape, text)


def terminal_safe(text: str) -> str:
    """Return `text` with control characters and invalid UTF-8 escaped, and backslashes left as they are.

    For whole messages, whose names `printable` has escaped already: escaping their backslashes again
    would double them.
    """
    return _IN_LINE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines carry no raw control character (a traceback keeps its newlines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return terminal_safe(super().formatMessage(record))
