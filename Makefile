# tarfuse: `make demo` and `make test` set up everything they need on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What pip needs to build pyfuse3 (from source: there is no wheel), for the venv and for `make install`;
# patch applies PYFUSE3_PATCH.
BUILD_PACKAGES := libfuse3-dev pkg-config gcc patch python3 python3-venv python3-dev
# What the tests and the demo run: FUSE, QEMU, and the other tar programs the tests compare against.
APT_PACKAGES := $(BUILD_PACKAGES) fuse3 qemu-utils qemu-system-x86 libarchive-tools busybox \
	e2fsprogs fio util-linux gzip pigz zstd xz-utils bzip2 dictzip man-db xorriso udftools
APT_STAMP := $(VENV)/.apt-done
BUILD_STAMP := $(VENV)/.build-deps-done
VENV_STAMP := $(VENV)/.installed

# pyfuse3 3.5 has no lseek handler, so SEEK_DATA/SEEK_HOLE on a mount say "all data"
# (scripts/pyfuse3/lseek.patch), and answers every READ through Python (direct-read.patch, which builds on
# it, answers those of registered file handles in C). Both venvs (dev and `make install`) get the pinned
# sdist, fetched through pip and checked by its sha256, with the patches of PYFUSE3_PATCH applied in order,
# built with the Cython of scripts/pyfuse3/build-constraints.txt into a wheel versioned
# 3.5.0+lseek.directread (scripts/pyfuse3/install.sh). PYFUSE3_PATCH=scripts/pyfuse3/lseek.patch builds
# 3.5.0+lseek; PYFUSE3_PATCH= (empty, here or on the command line: `make dev PYFUSE3_PATCH=`) gives plain
# pyfuse3 from the index, as pyproject.toml pins it; so does `pip install .`, which never needs the patches.
PYFUSE3_VERSION := 3.5.0
PYFUSE3_SHA256 := 88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCH ?= scripts/pyfuse3/lseek.patch scripts/pyfuse3/direct-read.patch
export PYFUSE3_VERSION PYFUSE3_SHA256 PYFUSE3_PATCH
# One stamp per choice (.pyfuse3-3.5.0+lseek.directread, .pyfuse3-index), so that changing PYFUSE3_PATCH
# reinstalls it. The local version as install.sh makes it: patch names without - and _, joined by dots.
_empty :=
_space := $(_empty) $(_empty)
PYFUSE3_LOCAL := $(subst $(_space),.,$(strip $(foreach patch,$(PYFUSE3_PATCH),\
	$(subst _,,$(subst -,,$(basename $(notdir $(patch))))))))
PYFUSE3_BUILT := $(if $(strip $(PYFUSE3_PATCH)),$(PYFUSE3_VERSION)+$(PYFUSE3_LOCAL),index)
PYFUSE3_STAMP := $(VENV)/.pyfuse3-$(PYFUSE3_BUILT)

.PHONY: all deps build-deps dev pyfuse3 azurite demo test test-fast lint format type check bench bench-compressed \
	fuzz stress fixtures install install-docs uninstall clean

all: dev

# Install the Debian packages named in $(1) that are missing: as root with apt-get, else say how.
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root, or: sudo apt-get install $$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

deps: $(APT_STAMP)
$(APT_STAMP):
	$(call apt_install,$(APT_PACKAGES))
	@mkdir -p $(VENV) && touch $@ $(BUILD_STAMP)

# lint, type and test-fast need only these (and no root once they are there): not QEMU.
build-deps: $(BUILD_STAMP)
$(BUILD_STAMP):
	$(call apt_install,$(BUILD_PACKAGES))
	@mkdir -p $(VENV) && touch $@

dev: $(VENV_STAMP)
$(VENV_STAMP): pyproject.toml $(BUILD_STAMP) $(PYFUSE3_STAMP)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# compat: the checkout goes on sys.path through a .pth line; the default mode's import hook
	@# (importlib.metadata, pathlib) runs at every start of tarfuse (its cost: docs/benchmarks.md, "Ready").
	$(PY) -m pip install -q -e '.[test,dev]' --config-settings editable_mode=compat
	@# Bytecode now: a start that compiles tarfuse's modules is slower (docs/benchmarks.md, "Ready"), and
	@# one by a user who cannot write the checkout's __pycache__ (a root-owned checkout) would pay it every time.
	$(PY) -m compileall -q tarfuse
	@# tests/ on sys.path through a .pth line too, so that scripts and `python -c` import the test kit
	@# (tests/kit) as pytest does: `import kit`.
	$(PY) -c 'import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_path("purelib"), "tarfuse-kit.pth").write_text(sys.argv[1] + "\n")' "$(CURDIR)/tests"
	@touch $@

# pyfuse3 before tarfuse, whose requirement it then satisfies.
pyfuse3: $(PYFUSE3_STAMP)
$(PYFUSE3_STAMP): $(PYFUSE3_PATCH) $(wildcard scripts/pyfuse3/*.sh scripts/pyfuse3/*.txt) $(BUILD_STAMP)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	scripts/pyfuse3/install.sh $(PY)
	@rm -f $(VENV)/.pyfuse3-* && touch $@

# Azurite, Azure's blob-storage emulator, for the az:// tests (tests/kit/objectstores.py, which skips them
# without it): from npm into the venv, which git ignores and `make clean` removes; never fetched at test time.
# Debian's nodejs and npm only when there is no npm (a NodeSource nodejs brings its own, and conflicts).
AZURITE_DIR := $(VENV)/node
AZURITE_STAMP := $(AZURITE_DIR)/.azurite-3
azurite: $(AZURITE_STAMP)
$(AZURITE_STAMP):
	$(call apt_install,$(if $(shell command -v npm),,nodejs npm))
	npm install --no-audit --no-fund --prefix $(AZURITE_DIR) azurite@3
	@touch $@

demo: dev deps
	$(PY) scripts/demo.py

test: dev deps $(AZURITE_STAMP)
	$(PY) -m pytest -q

test-fast: dev
	$(PY) -m pytest -q -m "not fuse"

# ruff alone: linting needs neither the package nor its build dependencies.
$(VENV)/bin/ruff:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q ruff

lint: $(VENV)/bin/ruff
	$(VENV)/bin/ruff check tarfuse tests scripts
	$(VENV)/bin/ruff format --check tarfuse tests scripts

format: $(VENV)/bin/ruff
	$(VENV)/bin/ruff format tarfuse tests scripts
	$(VENV)/bin/ruff check --fix tarfuse tests scripts

type: dev
	$(VENV)/bin/mypy

check: lint type test

# The benches (scripts/bench/, one package): plain archives against the limit, the C ceiling (built on first
# use into build/) and the peers (docs/benchmarks.md), then compressed (docs/compressed.md) and remote
# archives (docs/remote.md), and a fleet booting from object storage (docs/benchmarks.md). BENCH_ARGS=--quick for
# a smoke run.
bench: dev deps
	$(PY) -m scripts.bench --peers $(BENCH_ARGS)
	$(PY) -m scripts.bench.compressed $(BENCH_ARGS)
	$(PY) -m scripts.bench.remote $(BENCH_ARGS)
	$(PY) -m scripts.bench.fleet $(BENCH_ARGS)

bench-compressed: dev deps
	$(PY) -m scripts.bench.compressed $(BENCH_ARGS)

# The long forms of what `make test` runs briefly: >= 1,000,000 mutated archives; a 10-minute load.
fuzz: dev deps
	$(PY) scripts/fuzz.py $(FUZZ_ARGS)

stress: dev deps
	$(PY) scripts/stress.py $(STRESS_ARGS)

fixtures:
	scripts/make-fixtures.sh

# mount.fuse3 (fstab, systemd .mount units) runs `tarfuse` with mount's own fixed PATH (/usr/local/bin is on
# it). The install is a venv of its own under $(PREFIX)/lib/tarfuse, made from Debian's python3 (which every
# user can run; the checkout's may live in root's home), with a non-editable copy of tarfuse: `make clean`,
# or moving or deleting the checkout, leaves it working. `make uninstall` removes all of it.
PREFIX ?= /usr/local
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL_DIR := $(PREFIX)/lib/tarfuse
DOC_DIR := $(PREFIX)/share/doc/tarfuse
install: build-deps
	$(INSTALL_PYTHON) -m venv --clear $(INSTALL_DIR)
	$(INSTALL_DIR)/bin/python -m pip install -q --upgrade pip
	scripts/pyfuse3/install.sh $(INSTALL_DIR)/bin/python
	$(INSTALL_DIR)/bin/python -m pip install -q .
	install -d $(PREFIX)/bin
	ln -sfn $(INSTALL_DIR)/bin/tarfuse $(PREFIX)/bin/tarfuse
	$(MAKE) --no-print-directory install-docs MANPAGE_PYTHON=$(INSTALL_DIR)/bin/python
	@echo "installed $(PREFIX)/bin/tarfuse (in $(INSTALL_DIR)), $(PREFIX)/share/man/man1/tarfuse.1 and $(DOC_DIR)"

# The man page and the documents it names (README.md, docs/compressed.md, docs/remote.md), which it finds
# in $(DOC_DIR). Apart from install so that tests/test_docs.py can check it without building a venv.
MANPAGE_PYTHON ?= $(PY)
install-docs:
	install -d $(PREFIX)/share/man/man1 $(DOC_DIR)
	install -m 0644 README.md docs/compressed.md docs/remote.md $(DOC_DIR)/
	$(MANPAGE_PYTHON) -m tarfuse.manpage --doc-dir $(DOC_DIR) > $(PREFIX)/share/man/man1/tarfuse.1

# Side files are the users' data (an index is minutes of decompression to rebuild): never removed here, only
# named, so that whoever wants the space back knows where to look.
uninstall:
	@if [ -L $(PREFIX)/bin/tarfuse ] && [ "$$(readlink $(PREFIX)/bin/tarfuse)" = $(INSTALL_DIR)/bin/tarfuse ]; \
		then rm -f $(PREFIX)/bin/tarfuse; fi
	rm -rf $(INSTALL_DIR) $(DOC_DIR)
	rm -f $(PREFIX)/share/man/man1/tarfuse.1
	@echo "left in place: tarfuse's caches (/var/cache/tarfuse for root, ~/.cache/tarfuse or" \
		"\$$XDG_CACHE_HOME/tarfuse for each user) and the side files beside archives" \
		"(*.tarfuse-index, *.tarfuse-spill.zst); remove them by hand if they are no longer wanted" \
		"(before uninstalling, tarfuse --cache --prune empties the caller's cache)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
