"""The support kit of the tests and the scripts: what both need to build archives and run tarfuse.

mounts: run a FUSE daemon in the foreground, wait for its mount, probe it, unmount it, stop it.
sample: the bootable sparse sample image (the demo's and the tests'), and archives of it by real tar programs.
qemu: boot a raw image in QEMU and wait for its boot sector's line on COM1 (tests, demo, benches).
tarbuilder, sparsegen: archives built byte by byte, and sparse layouts with their expected bytes.
httpserver: a range-capable HTTP server on 127.0.0.1, with faults on demand.
faultyfs, readers: programs the tests run: storage with bad sectors, and readers that check every byte.
users: real throwaway accounts, and commands run as them.
archives, ext4: archives and images several test folders build (a GCE tarball, an ext4 image).
fuzz: the fuzz engine of `make fuzz` and tests/test_fuzz.py.
needs, fixtures: for the tests only, they import pytest: skips for what a test needs (a tool, root, loop
devices), and the fixtures several folders share (the HTTP server, TLS files, a QEMU boot).

pytest finds the kit through `pythonpath = ["tests"]` (pyproject.toml); everything else (scripts,
`python -c`) through the .pth file that `make dev` writes into the venv. The other modules import no
pytest: the scripts use them too.
"""
