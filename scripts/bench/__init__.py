"""The benches of `make bench` (docs/benchmarks.md): `python -m scripts.bench` measures plain and sparse
archives against the limit, the C ceiling and the peers; `.compressed`, `.remote` and `.seek` the others.
harness serves and times for all of them, report prints their tables; each module's docstring says its job.
"""
