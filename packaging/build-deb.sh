#!/bin/bash
# Build mcrelay_<version>_all.deb with plain dpkg-deb (no debhelper needed).
#
#   bash packaging/build-deb.sh [OUTDIR]      (default OUTDIR: build/)
#
# The package installs the mcrelay Python package into
# /usr/lib/python3/dist-packages (Debian's python3 and python3-pyroute2 run it),
# /usr/bin/mcrelayd and /usr/bin/mcrelay wrappers generated from
# pyproject.toml [project.scripts], the systemd unit and an example config.
# Prints the path of the .deb on the last line of stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
outdir=${1:-$top/build}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)

for tool in dpkg-deb python3; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool not found" >&2; exit 1; }
done

version=$(python3 -c 'import re,sys; print(re.search(r"^__version__ = \"([^\"]+)\"", open(sys.argv[1]).read(), re.M).group(1))' \
    "$top/src/mcrelay/__init__.py")

stage=$(mktemp -d "${TMPDIR:-/tmp}/mcrelay-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root
pkgdir=$root/usr/lib/python3/dist-packages

# The Python package, without caches or build residue.
install -d "$pkgdir" "$root/usr/bin" "$root/lib/systemd/system" \
    "$root/usr/share/doc/mcrelay/examples"
tar -C "$top/src" --exclude='__pycache__' --exclude='*.pyc' --exclude='*.pyo' \
    -cf - mcrelay | tar -C "$pkgdir" -xf -

# Command wrappers from [project.scripts]. -I: a root daemon must not pick up
# PYTHONPATH or a user site directory from its environment.
python3 - "$top/pyproject.toml" "$top/src" "$root/usr/bin" <<'PY'
import os, sys, tomllib
pyproject, src, bindir = sys.argv[1:]
with open(pyproject, "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
for name in ("mcrelayd", "mcrelay"):
    if name not in scripts:
        sys.exit(f"build-deb: pyproject.toml [project.scripts] has no {name}")
for name, target in sorted(scripts.items()):
    module, _, func = target.partition(":")
    rel = module.replace(".", "/")
    if not (os.path.isfile(f"{src}/{rel}.py") or os.path.isfile(f"{src}/{rel}/__init__.py")):
        sys.exit(f"build-deb: {name} runs {target} but src/{rel}.py does not exist")
    path = os.path.join(bindir, name)
    with open(path, "w") as f:
        f.write(
            "#!/usr/bin/python3 -I\n"
            f'"""{name}: installed by the mcrelay Debian package."""\n'
            "import sys\n\n"
            f"from {module} import {func}\n\n"
            f"sys.exit({func}())\n"
        )
    os.chmod(path, 0o755)
PY

install -m 0644 "$here/mcrelay.service" "$root/lib/systemd/system/mcrelay.service"
install -m 0644 "$here/mcrelay.toml" "$root/usr/share/doc/mcrelay/examples/mcrelay.toml"
install -m 0644 "$here/debian/copyright" "$root/usr/share/doc/mcrelay/copyright"

# Normalise permissions whatever the checkout's umask was.
find "$root" -type d -exec chmod 0755 {} +
find "$root" -type f ! -path "$root/usr/bin/*" -exec chmod 0644 {} +

installed_size=$(du -sk --apparent-size "$root" | cut -f1)
install -d -m 0755 "$root/DEBIAN"
sed -e "s/@VERSION@/$version/" -e "s/@INSTALLED_SIZE@/$installed_size/" \
    "$here/debian/control.in" >"$root/DEBIAN/control"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$root/DEBIAN/$script"
done
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

deb=$outdir/mcrelay_${version}_all.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
