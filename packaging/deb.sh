#!/bin/bash
# Build the Debian package from debian/ with dpkg-buildpackage, in a copy of
# the tree, with Debian's tools only (no PyPI, no virtualenv).
#
#   bash packaging/deb.sh build [OUTDIR]   build OUTDIR/mcrelay_<version>_all.deb
#   bash packaging/deb.sh check [OUTDIR]   build twice, compare byte for byte, lintian
#
# OUTDIR defaults to build/. The copy holds the working tree as `git add -A`
# would see it (tracked files and new ones, nothing .gitignore excludes), so
# virtualenvs and build output never reach the package and the build never
# writes into the checkout. The environment is reset (env -i): a pyenv or
# virtualenv python3 on PATH must not build a package for Debian's python3.
# `build` prints the path of the .deb on the last line of stdout.
set -euo pipefail

mode=${1:?usage: deb.sh build|check [OUTDIR]}
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
outdir=${2:-$top/build}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)

for tool in dpkg-buildpackage dh dpkg-parsechangelog; do
    command -v "$tool" >/dev/null || { echo "deb.sh: $tool not found (make deb installs it)" >&2; exit 1; }
done

version=$(dpkg-parsechangelog -l "$top/debian/changelog" -S Version)
epoch=$(dpkg-parsechangelog -l "$top/debian/changelog" -S Timestamp)
deb_name=mcrelay_${version}_all.deb

# snapshot TARFILE: the working tree's files as git sees them, every mtime set to
# the changelog's date, so the package does not depend on when files were
# checked out or touched (dpkg-deb only clamps mtimes newer than that date).
snapshot() {
    if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
        (cd "$top" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
            [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done |
            tar --null --no-recursion --mtime="@$epoch" -cf "$1" -T -)
    else
        tar -C "$top" --exclude=./.git --exclude='./.venv*' --exclude=./build \
            --mtime="@$epoch" -cf "$1" .
    fi
}

# build_in DIR TARFILE UMASK TZ: unpack and build in DIR; the .deb lands in DIR.
build_in() {
    local dir=$1 tarfile=$2 mask=$3 tz=$4 src
    rm -rf "$dir"
    src=$dir/mcrelay-$version
    mkdir -p "$src"
    tar -C "$src" -xf "$tarfile"
    (cd "$src" && umask "$mask" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME="$dir" TZ="$tz" LC_ALL=C.UTF-8 \
        dpkg-buildpackage -us -uc -b) >"$dir/build.log" 2>&1 || {
        tail -n 40 "$dir/build.log" >&2
        echo "deb.sh: dpkg-buildpackage failed; full log: $dir/build.log" >&2
        return 1
    }
    test -f "$dir/$deb_name"
}

work=$outdir/deb-work
mkdir -p "$work"
tarfile=$work/tree.tar
snapshot "$tarfile"

case "$mode" in
build)
    build_in "$work/b" "$tarfile" 022 UTC
    for f in "$work/b"/mcrelay_"$version"_*; do
        [ -f "$f" ] && mv -f "$f" "$outdir/"
    done
    echo "$outdir/$deb_name"
    ;;
check)
    # Two builds in different directories, umasks and time zones, at different
    # times: SOURCE_DATE_EPOCH (from debian/changelog) must be the only clock.
    build_in "$work/a" "$tarfile" 022 UTC
    build_in "$work/second-build" "$tarfile" 002 Pacific/Auckland
    if cmp "$work/a/$deb_name" "$work/second-build/$deb_name"; then
        echo "reproducible: two builds of $deb_name are byte-identical ($(sha256sum <"$work/a/$deb_name" | cut -c1-16))"
    else
        echo "NOT reproducible: the two builds of $deb_name differ" >&2
        if command -v diffoscope >/dev/null; then
            diffoscope "$work/a/$deb_name" "$work/second-build/$deb_name" >&2 || true
        else
            diff <(dpkg-deb -c "$work/a/$deb_name") <(dpkg-deb -c "$work/second-build/$deb_name") >&2 || true
        fi
        exit 1
    fi
    cp -f "$work/a/$deb_name" "$outdir/"
    command -v lintian >/dev/null || { echo "deb.sh: lintian not found" >&2; exit 1; }
    echo "lintian $deb_name:"
    # Default level (errors and warnings shown); any error or warning fails.
    lintian --fail-on error,warning "$outdir/$deb_name" && echo "lintian: no errors, no warnings"
    ;;
*)
    echo "usage: deb.sh build|check [OUTDIR]" >&2
    exit 1
    ;;
esac
