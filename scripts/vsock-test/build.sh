#!/usr/bin/env bash
# Builds the Linux kernel's own vsock test program, vsock_test, from Debian's linux-source
# package of the guest kernel's series, statically, for the guests to run:
#
#   OUTDIR/vsock_test     static x86_64 binary (the kernel's tools/testing/vsock, GPL-2.0)
#   OUTDIR/VERSION        the source package version it was built from
#
# usage: scripts/vsock-test/build.sh [OUTDIR]      (default: target/vsock-test)
#
# The package is downloaded (apt-get download), never installed, and only tools/testing/vsock
# and tools/include are taken out of it. Nothing of it is committed. SOURCE_PKG picks another
# package than linux-source-6.1. Re-running reuses the download and the build.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/target/vsock-test}
pkg=${SOURCE_PKG:-linux-source-6.1}
mkdir -p "$out"
out=$(cd "$out" && pwd)
say() { echo "vsock-test-build: $*" >&2; }
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo

if [ -x "$out/vsock_test" ] && [ -f "$out/VERSION" ]; then
    say "have $out/vsock_test ($(cat "$out/VERSION"))"
    exit 0
fi

mkdir -p "$out/deb"
deb=$(ls "$out"/deb/"$pkg"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    say "downloading $pkg"
    (cd "$out/deb" && apt-get download -q "$pkg" >&2) \
        || { $sudo apt-get update -q >&2; (cd "$out/deb" && apt-get download -q "$pkg" >&2); }
    deb=$(ls "$out"/deb/"$pkg"_*.deb | head -n1)
fi
version=$(dpkg-deb -f "$deb" Version)

src="$out/src"
rm -rf "$src"
mkdir -p "$src"
say "unpacking tools/testing/vsock from $pkg $version"
# The .deb holds /usr/src/<pkg>.tar.xz; only the two folders the test needs come out of it.
dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$pkg.tar.xz" \
    | tar -xJ -C "$src" --strip-components=1 --wildcards \
        "$pkg/tools/testing/vsock/*" "$pkg/tools/include/*"

say "building vsock_test"
cd "$src/tools/testing/vsock"
# As the kernel's Makefile, against this machine's kernel headers (linux-libc-dev) instead of
# an exported tree, and static so that it runs in the guest's busybox initramfs.
gcc -static -O2 -g -Wall -D_GNU_SOURCE -I. -I../../include -Wno-pointer-sign \
    -fno-strict-overflow -fno-strict-aliasing -fno-common -U_FORTIFY_SOURCE \
    -o "$out/vsock_test" vsock_test.c timeout.c control.c util.c 2> "$out/build.log" \
    || { cat "$out/build.log" >&2; exit 1; }
echo "$pkg $version" > "$out/VERSION"
say "built $out/vsock_test from $pkg $version: $("$out/vsock_test" --list | tail -n +2 | wc -l) test cases"
