"""tarfuse(1) and the README's option table, made from the command line's own definitions.

Mount helpers come with a man page (sshfs(1), mount.fuse3(8)); ours is written from cli's argparse parser and
its MOUNT_OPTION_HELP, the same words that --help prints, so the three cannot drift apart
(tests/test_docs.py renders the page with man(1) and checks the README's table).

    python -m tarfuse.manpage > tarfuse.1        # what `make install` does
    python -m tarfuse.manpage --readme-table     # the table between the markers in README.md
"""

import argparse
import sys
import time

from tarfuse import __version__, cli

README_BEGIN = "<!-- options: made by `python -m tarfuse.manpage --readme-table`; edit cli.py, not here -->"
README_END = "<!-- end of options -->"

_SEE_ALSO = ("mount.fuse3(8)", "fusermount3(1)", "fstab(5)", "qemu-img(1)", "losetup(8)", "tar(1)")


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens (\\- stays a minus when copied), and leading dots."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _flags(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(the flag's spellings with its argument, its help) for every option the parser knows."""
    rows = []
    for action in parser._actions:  # argparse has no public list of its actions
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        words = ", ".join(action.option_strings)
        if action.metavar is not None or action.nargs != 0:
            words += f" {action.metavar or action.dest.upper()}"
        rows.append((words, action.help or ""))
    return rows


def render_man_page() -> str:
    """The roff source of tarfuse(1)."""
    parser = cli.parser()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [
        f'.TH TARFUSE 1 "{date}" "tarfuse {__version__}" "User Commands"',
        ".SH NAME",
        "tarfuse \\- mount the disk image inside a tar archive as one read\\-only file",
        ".SH SYNOPSIS",
        ".B tarfuse",
        "[\\fB\\-f\\fR] [\\fB\\-d\\fR] [\\fB\\-o\\fR \\fIOPT\\fR[,\\fIOPT\\fR...]]",
        "\\fIARCHIVE\\fR \\fIMOUNTPOINT\\fR",
        ".br",
        ".B tarfuse \\-\\-list",
        "[\\fB\\-\\-json\\fR] \\fIARCHIVE\\fR",
        ".SH DESCRIPTION",
        _roff(cli.DESCRIPTION),
        ".SH OPTIONS",
    ]
    for words, meaning in _flags(parser):
        lines += [".TP", f".B {_roff(words)}", _roff(meaning)]
    lines.append(".SH MOUNT OPTIONS")
    for words, meaning in cli.MOUNT_OPTION_HELP:
        lines += [".TP", f".B \\-o {_roff(words)}", _roff(meaning)]
    lines += [
        ".PP",
        _roff(cli.GENERIC_WORDS),
        ".SH EXAMPLES",
        ".nf",
        _roff(cli.FSTAB_EXAMPLE),
        ".fi",
        ".SH EXIT STATUS",
        _roff(cli.EXIT_STATUS),
        ".SH SEE ALSO",
        ", ".join(f"\\fB{name.partition('(')[0]}\\fR({name.partition('(')[2]}" for name in _SEE_ALSO),
    ]
    return "\n".join(lines) + "\n"


def render_readme_table() -> str:
    """The Markdown table of options that README.md carries between README_BEGIN and README_END."""
    rows = ["| option | meaning |", "| --- | --- |"]
    rows += [f"| `{words}` | {meaning} |" for words, meaning in _flags(cli.parser()) if words != "-h, --help"]
    rows += [f"| `-o {words}` | {meaning} |" for words, meaning in cli.MOUNT_OPTION_HELP]
    return "\n".join([README_BEGIN, *rows, "", cli.GENERIC_WORDS, cli.EXIT_STATUS, README_END]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tarfuse.manpage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme-table", action="store_true", help="print the README's option table")
    args = parser.parse_args(argv)
    print(render_readme_table() if args.readme_table else render_man_page(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
