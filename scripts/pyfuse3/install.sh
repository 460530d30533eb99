#!/usr/bin/env bash
# Install pyfuse3 into the venv of PYTHON, before tarfuse itself (make dev, make install; see the Makefile).
#
# PYFUSE3_PATCH names patches, separated by spaces, applied in that order (a later one may build on an
# earlier one): the pinned sdist pyfuse3==$PYFUSE3_VERSION is fetched through pip from the configured index,
# checked against $PYFUSE3_SHA256, patched, and built (Cython pinned by build-constraints.txt beside this
# script) into a wheel versioned $PYFUSE3_VERSION+<patch names>, each name without its .patch and without
# - or _, joined by dots (a PEP 440 local version: lseek.patch direct-read.patch give 3.5.0+lseek.directread),
# so `pip show pyfuse3` tells a patched build. The wheel is kept under build/pyfuse3/, keyed by the sdist,
# the patches in their order and the constraints, so `make install` reuses what `make dev` built for the
# same Python version.
#
# PYFUSE3_PATCH empty: a patched build that is installed is removed, and tarfuse's own install then brings
# plain pyfuse3 from the index, as pyproject.toml pins it.
#
# Usage: PYFUSE3_VERSION=3.5.0 PYFUSE3_SHA256=... \
#        PYFUSE3_PATCH="scripts/pyfuse3/lseek.patch scripts/pyfuse3/direct-read.patch" install.sh PYTHON
set -euo pipefail

python=$1
: "${PYFUSE3_VERSION:?}" "${PYFUSE3_SHA256:?}"
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

read -r -a named <<< "${PYFUSE3_PATCH-}"
if [ ${#named[@]} -eq 0 ]; then
    installed=$("$python" -m pip show pyfuse3 2>/dev/null | sed -n 's/^Version: //p')
    if [[ $installed == *+* ]]; then
        "$python" -m pip uninstall -q -y pyfuse3
        echo "pyfuse3 $installed removed from $python: tarfuse's install brings pyfuse3 from the index"
    fi
    exit 0
fi

patches=()
local_version=
for name in "${named[@]}"; do
    patches+=("$(realpath "$name")")
    stem=$(basename "$name" .patch)
    local_version+=${local_version:+.}${stem//[-_]/}
done
constraints=$here/build-constraints.txt
version=$PYFUSE3_VERSION+$local_version
key=$({ echo "$PYFUSE3_VERSION $PYFUSE3_SHA256"; cat "${patches[@]}" "$constraints"; } | sha256sum | cut -c1-16)
wheels=$root/build/pyfuse3/$key

install_wheel() {
    "$python" -m pip install -q --no-deps --force-reinstall --no-index --find-links "$wheels" \
        "pyfuse3==$version"
}

if ! install_wheel 2>/dev/null; then
    mkdir -p "$root/build/pyfuse3"
    work=$(mktemp -d "$root/build/pyfuse3/tmp.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    "$python" -m pip download -q --no-deps --no-binary pyfuse3 --build-constraint "$constraints" \
        -d "$work" "pyfuse3==$PYFUSE3_VERSION"
    sdist=$work/pyfuse3-$PYFUSE3_VERSION.tar.gz
    if ! echo "$PYFUSE3_SHA256  $sdist" | sha256sum --check --quiet; then
        echo "pyfuse3-$PYFUSE3_VERSION.tar.gz from the index is not the sdist the patch was made for" >&2
        echo "(sha256 $(sha256sum < "$sdist" | cut -d' ' -f1), expected $PYFUSE3_SHA256)" >&2
        exit 1
    fi
    tar -xzf "$sdist" -C "$work"
    src=$work/pyfuse3-$PYFUSE3_VERSION
    for patch in "${patches[@]}"; do
        patch -d "$src" -p1 --forward --batch --quiet < "$patch"
    done
    # Cython's output for the unpatched sources: without it, a build that does not run Cython fails
    # rather than compiling stale C code.
    rm "$src/src/pyfuse3/__init__.c"
    SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=$version "$python" -m pip wheel -q --no-deps \
        --build-constraint "$constraints" -w "$work/dist" "$src"
    mkdir -p "$wheels"
    mv "$work"/dist/pyfuse3-*.whl "$wheels"/
    install_wheel
fi
echo "pyfuse3 $version (pinned sdist + $(realpath --relative-to="$root" "${patches[@]}" | paste -sd' ')) installed" \
    "for $python"
