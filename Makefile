# tarfuse: `make demo` and `make test` set up everything they need on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What the tests and the demo run: FUSE, QEMU, and the other tar programs the tests compare against.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config qemu-utils qemu-system-x86 libarchive-tools busybox \
	e2fsprogs fio util-linux gzip zstd xz-utils bzip2
APT_STAMP := $(VENV)/.apt-done
VENV_STAMP := $(VENV)/.installed

.PHONY: all deps dev demo test test-fast lint format type check bench bench-compressed fuzz stress fixtures install clean

all: dev

deps: $(APT_STAMP)
$(APT_STAMP):
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root, or: sudo apt-get install $$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

dev: $(VENV_STAMP)
$(VENV_STAMP): pyproject.toml $(APT_STAMP)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# compat: the checkout goes on sys.path through a .pth line; the default mode's import hook costs
	@# ~12 ms (importlib.metadata, pathlib) at every start of tarfuse (docs/benchmarks.md, ready time).
	$(PY) -m pip install -q -e '.[test,dev]' --config-settings editable_mode=compat
	@touch $@

demo: dev
	$(PY) scripts/demo.py

test: dev
	$(PY) -m pytest -q

test-fast: dev
	$(PY) -m pytest -q -m "not fuse"

lint: dev
	$(VENV)/bin/ruff check tarfuse tests scripts
	$(VENV)/bin/ruff format --check tarfuse tests scripts

format: dev
	$(VENV)/bin/ruff format tarfuse tests scripts
	$(VENV)/bin/ruff check --fix tarfuse tests scripts

type: dev
	$(VENV)/bin/mypy

check: lint type test

# Plain, compressed and remote archives against the limit and the peers (docs/*.md); BENCH_ARGS=--quick.
bench: dev
	$(PY) scripts/bench.py $(BENCH_ARGS)
	$(PY) scripts/bench_compressed.py $(BENCH_ARGS)
	$(PY) scripts/bench_remote.py $(BENCH_ARGS)

# Compressed archives (docs/compressed.md); BENCH_ARGS=--quick for a 256 MiB image.
bench-compressed: dev
	$(PY) scripts/bench_compressed.py $(BENCH_ARGS)

# The long forms of what `make test` runs briefly: >= 1,000,000 mutated archives; a 10-minute load.
fuzz: dev
	$(PY) scripts/fuzz.py $(FUZZ_ARGS)

stress: dev
	$(PY) scripts/stress.py $(STRESS_ARGS)

fixtures:
	scripts/make-fixtures.sh

# mount.fuse3 (fstab, systemd .mount units) runs `tarfuse` with a fixed PATH: link it where that PATH looks.
PREFIX ?= /usr/local
install: dev
	ln -sf $(abspath $(VENV))/bin/tarfuse $(DESTDIR)$(PREFIX)/bin/tarfuse
	@echo "linked $(DESTDIR)$(PREFIX)/bin/tarfuse -> $(abspath $(VENV))/bin/tarfuse"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
