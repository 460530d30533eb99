#!/usr/bin/env bash
# Make the committed GNU tar fixtures (run by hand or with `make fixtures`; the output is committed):
#   tests/data/{gnu,pax-0.0,pax-0.1,pax-1.0}.tar  one sparse disk.img per archive, in each GNU tar dialect
#   tests/data/SHA256SUMS                         the expanded disk.img, as `sha256sum -c` checks it
# disk.img is 1 MiB with two 4 KiB data runs; its content and mtime are fixed, so only the PID in the
# PAX 0.1 and 1.0 pseudo names (GNUSparseFile.%p) changes between runs.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/tests/data
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tar --version | head -n 1
mkdir -p "$out" "$work/src" "$work/check"
img=$work/src/disk.img
truncate -s 1M "$img"
head -c 4096 < <(yes 'tarfuse fixture: first data run, 64 KiB into the image.') |
	dd of="$img" bs=4096 seek=16 conv=notrunc status=none
head -c 4096 < <(yes 'tarfuse fixture: second data run, at 800 KiB.') |
	dd of="$img" bs=4096 seek=200 conv=notrunc status=none
chmod 644 "$img"
touch -d @1700000000 "$img"

common=(--sparse --owner=0 --group=0 --numeric-owner --mtime=@1700000000 -C "$work/src")
pax=(--format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime)
tar --format=gnu "${common[@]}" -cf "$out/gnu.tar" disk.img
for version in 0.0 0.1 1.0; do
	tar "${pax[@]}" --sparse-version="$version" "${common[@]}" -cf "$out/pax-$version.tar" disk.img
done
(cd "$work/src" && sha256sum disk.img) > "$out/SHA256SUMS"

# Every archive must extract to the same bytes with GNU tar itself.
for archive in "$out"/*.tar; do
	rm -f "$work/check/disk.img"
	tar -xf "$archive" -C "$work/check"
	(cd "$work/check" && sha256sum --quiet -c "$out/SHA256SUMS")
done
ls -l "$out"
