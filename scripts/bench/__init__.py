"""The benches of `make bench`, one job per module. Run from the checkout: `python -m scripts.bench`.

__main__    the plain-archive bench: options, which tools and cases, the run, where the report goes
data        the cases' data: images, the archives that hold them, their expected bytes
tools       the servers of every run: the limits, the C ceiling (fuse_ceiling.c), tarfuse
peers       the other programs that serve a tar member, measured with --peers
host        what changes on the machine: packages installed, DAMON reclaim paused
harness     serving a FUSE daemon and timing reads, shared by all the benches
measure     one case's bytes checked and metrics timed, and the boot step
results     the figures of a run, their ratios and the targets
report      markdown tables, JSON, the chart, the generated part of docs/benchmarks.md
compressed, remote, seek   the other benches (docs/compressed.md, docs/remote.md, docs/benchmarks.md);
            libprobe is compressed.py's child process
"""
