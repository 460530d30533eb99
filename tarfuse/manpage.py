"""tarfuse(1) and the README's option table, made from the command line's own definitions.

Mount helpers come with a man page (sshfs(1), mount.fuse3(8)); ours is written from cli's argparse parser and
its MOUNT_OPTION_HELP, the same words that --help prints, so the three cannot drift apart
(tests/test_docs.py renders the page with man(1) and checks the README's table).

    python -m tarfuse.manpage --doc-dir DIR > tarfuse.1   # what `make install` does (DIR: where it put docs/)
    python -m tarfuse.manpage --readme-table     # the table between the markers in README.md
"""

import argparse
import sys
import time

from tarfuse import __version__, cli, helptext

README_BEGIN = "<!-- options: made by `python -m tarfuse.manpage --readme-table`; edit cli.py, not here -->"
README_END = "<!-- end of options -->"

_SEE_ALSO = (
    "mount.fuse3(8)",
    "fusermount3(1)",
    "fstab(5)",
    "systemd.mount(5)",
    "qemu-img(1)",
    "losetup(8)",
    "tar(1)",
)
# The documents the page names; `make install` puts them in its --doc-dir.
DOCS = ("README.md", "compressed.md", "remote.md")

# (what, what it is): the side files a mount writes, and where (sources/index.py, spill.py, sidefiles.py).
FILES = (
    (
        "ARCHIVE.tarfuse-index",
        "the seek index of a compressed archive, kept for the next mount; beside the archive if nobody but "
        "you or root can change its directory and you can write there, else in your cache directory "
        "(below), named by a hash of the archive's path; choose with -o index=PATH, keep none with -o "
        "noindex. A stale or planted one is rebuilt, never trusted.",
    ),
    (
        "ARCHIVE.tarfuse-spill.zst",
        "beside the index: a one-frame zstd or one-block xz archive copied into a seekable form by the "
        "first mount's background pass, about the size of the decompressed tar compressed again; "
        "bounded by -o spill_max=SIZE (default 16 times the archive, at least 256M).",
    ),
    (
        "$XDG_CACHE_HOME/tarfuse, ~/.cache/tarfuse, /var/cache/tarfuse",
        "the cache directory (the first of these that is trusted; the last for root), created mode 0700: "
        "indexes and spills of http(s) archives, of compressed members, and of archives in read-only "
        "directories or ones that others can change. Each mount that keeps its index there first removes "
        "the entries of archives that are gone or changed, then the least recently used past -o "
        "cache_max=SIZE (default 16G). tarfuse --cache lists what it holds; tarfuse --cache --prune removes "
        "every entry no running mount uses (the next mount indexes again). make uninstall leaves it, and "
        "the side files beside archives.",
    ),
    ("/etc/fuse.conf", "a line user_allow_other lets users other than root mount with -o allow_other."),
)
ENVIRONMENT = (
    (
        "HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY",
        "the proxy for http(s) archives, in either case, as pip and curl read them; user info in the "
        "proxy URL is sent as Proxy-Authorization.",
    ),
    ("XDG_CACHE_HOME", "an absolute path: the cache directory is $XDG_CACHE_HOME/tarfuse (FILES)."),
    ("HOME", "without XDG_CACHE_HOME, the cache directory is $HOME/.cache/tarfuse."),
)
# (what it shows, the lines); the systemd unit is the README's ("At boot: fstab and systemd").
EXAMPLES = (
    (
        "List the disk images of an archive, then mount them on a directory:",
        "tarfuse --list vm.tar\ntarfuse vm.tar /mnt/vm",
    ),
    (
        "Every file of an OVA (the .ovf, the .mf and its disks) on a directory mount point, checked and "
        "converted:",
        "mkdir -p /mnt/ova\ntarfuse -o all vm.ova /mnt/ova\ncd /mnt/ova && sha256sum -c vm.mf\n"
        "virt-v2v -i ova /mnt/ova -o local -os /var/tmp",
    ),
    (
        "A bare compressed image on a file mount point:",
        "touch /tmp/disk.img\ntarfuse disk.img.xz /tmp/disk.img",
    ),
    ("In /etc/fstab, a local archive:", helptext.FSTAB_EXAMPLE),
    (
        "In /etc/fstab, an archive on a web server, mounted once the network is up (_netdev):",
        "https://images.example.com/vm.tar.zst /mnt/vm fuse.tarfuse ro,allow_other,_netdev,nofail 0 0",
    ),
    (
        "A systemd mount unit, /etc/systemd/system/mnt-vm.mount (its name is the mount point's path):",
        "[Unit]\nDescription=VM image from /srv/vm.tar\n\n[Mount]\nWhat=/srv/vm.tar\nWhere=/mnt/vm\n"
        "Type=fuse.tarfuse\nOptions=ro,allow_other,member=disk.raw\nMemoryMax=384M\n\n[Install]\n"
        "WantedBy=multi-user.target",
    ),
)


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


def render_man_page(doc_dir: str | None = None) -> str:
    """The roff source of tarfuse(1); `doc_dir`: where DOCS are installed, for SEE ALSO (None: not named)."""
    parser = cli.parser()
    date = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [
        f'.TH TARFUSE 1 "{date}" "tarfuse {__version__}" "User Commands"',
        ".SH NAME",
        "tarfuse \\- mount the disk image inside an archive as one read\\-only file",
        ".SH SYNOPSIS",
        ".B tarfuse",
        "[\\fB\\-f\\fR] [\\fB\\-d\\fR] [\\fB\\-o\\fR \\fIOPT\\fR[,\\fIOPT\\fR...]]",
        "\\fIARCHIVE\\fR \\fIMOUNTPOINT\\fR",
        ".br",
        ".B tarfuse \\-\\-list",
        "[\\fB\\-\\-json\\fR] \\fIARCHIVE\\fR",
        ".br",
        ".B tarfuse \\-\\-status",
        "[\\fB\\-\\-json\\fR] \\fIMOUNTPOINT\\fR",
        ".br",
        ".B tarfuse \\-\\-cache",
        "[\\fB\\-\\-prune\\fR] [\\fB\\-\\-json\\fR]",
        ".SH DESCRIPTION",
        _roff(helptext.DESCRIPTION),
        ".SH OPTIONS",
    ]
    for words, meaning in _flags(parser):
        lines += [".TP", f".B {_roff(words)}", _roff(meaning)]
    lines.append(".SH MOUNT OPTIONS")
    for words, meaning in helptext.MOUNT_OPTION_HELP:
        lines += [".TP", f".B \\-o {_roff(words)}", _roff(meaning)]
    lines += [".PP", _roff(helptext.GENERIC_WORDS), ".SH FILES"]
    for words, meaning in FILES:
        lines += [".TP", f".I {_roff(words)}", _roff(meaning)]
    lines.append(".SH ENVIRONMENT")
    for words, meaning in ENVIRONMENT:
        lines += [".TP", f".B {_roff(words)}", _roff(meaning)]
    lines += [".SH EXIT STATUS", _roff(helptext.EXIT_STATUS), ".SH EXAMPLES"]
    for what, example in EXAMPLES:
        lines += [".PP", _roff(what), ".PP", ".RS 4", ".nf", *map(_roff, example.split("\n")), ".fi", ".RE"]
    lines += [
        ".SH SEE ALSO",
        ", ".join(f"\\fB{name.partition('(')[0]}\\fR({name.partition('(')[2]}" for name in _SEE_ALSO),
    ]
    if doc_dir is not None:
        lines += [
            ".PP",
            "The limits, said plainly, and how compressed and remote archives are read:",
            ".RS 4",
            ".nf",
        ]
        lines += [_roff(f"{doc_dir}/{name}") for name in DOCS]  # a line each: a long path cannot be adjusted
        lines += [".fi", ".RE"]
    return "\n".join(lines) + "\n"


def render_readme_table() -> str:
    """The Markdown table of options that README.md carries between README_BEGIN and README_END."""
    rows = ["| option | meaning |", "| --- | --- |"]
    rows += [f"| `{words}` | {meaning} |" for words, meaning in _flags(cli.parser()) if words != "-h, --help"]
    rows += [f"| `-o {words}` | {meaning} |" for words, meaning in helptext.MOUNT_OPTION_HELP]
    return (
        "\n".join([README_BEGIN, *rows, "", helptext.GENERIC_WORDS, helptext.EXIT_STATUS, README_END]) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tarfuse.manpage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme-table", action="store_true", help="print the README's option table")
    parser.add_argument("--doc-dir", metavar="DIR", help="where README.md and docs/*.md are installed")
    args = parser.parse_args(argv)
    print(render_readme_table() if args.readme_table else render_man_page(args.doc_dir), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
