#!/usr/bin/env bash
# Builds the Linux guest the real-guest tests and the demo boot:
#
#   OUTDIR/vmlinuz            Debian's stock x86_64 kernel
#   OUTDIR/initramfs.cpio.gz  busybox, socat and the virtio/vsock modules; its /init loads
#                             the modules, runs /guest/run.sh, prints
#                             "GUEST-EXIT-STATUS: <rc>" and powers the VM off
#
# usage: scripts/guest/build.sh [OUTDIR]      (default: target/guest)
#
# Installs what it lacks with apt-get (qemu-system-x86, busybox-static, socat, cpio); set
# NO_APT=1 to forbid that. The kernel package is downloaded, never installed; KERNEL_PKG
# picks another than the one linux-image-amd64 names. Re-running reuses the download.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/target/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
say() { echo "guest-build: $*" >&2; }
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo

# --- host packages --------------------------------------------------------------------------
missing=()
for pkg in qemu-system-x86 busybox-static socat cpio; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "${NO_APT:-0}" != 1 ] || { say "missing ${missing[*]} and NO_APT=1"; exit 1; }
    say "installing ${missing[*]}"
    apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
    # A fresh machine may have no package lists yet.
    apt_install "${missing[@]}" || { $sudo apt-get update -q; apt_install "${missing[@]}"; }
fi

# --- kernel ---------------------------------------------------------------------------------
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'; }
pkg=${KERNEL_PKG:-$(kernel_pkg)}
if [ -z "$pkg" ]; then $sudo apt-get update -q >&2; pkg=$(kernel_pkg); fi
[ -n "$pkg" ] || { say "cannot tell which kernel package linux-image-amd64 names"; exit 1; }

mkdir -p "$out/deb"
deb=$(ls "$out/deb/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    say "downloading $pkg"
    # Old package lists can name a .deb the mirror dropped: refresh once and retry.
    (cd "$out/deb" && apt-get download -q "$pkg" >&2) \
        || { $sudo apt-get update -q >&2; (cd "$out/deb" && apt-get download -q "$pkg" >&2); }
    deb=$(ls "$out/deb/${pkg}"_*.deb | head -n1)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg -x "$deb" "$work/kernel"
release=$(ls "$work/kernel/lib/modules" | head -n1)
cp "$work/kernel/boot/vmlinuz-$release" "$out/vmlinuz"
echo "$release" > "$out/kernel-release"

# --- initramfs ------------------------------------------------------------------------------
stage=$work/stage
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,guest,lib/modules}
# Debian builds virtio, virtio-pci and vsock as modules; listed in dependency order. The
# network driver is for the kernel's vsock_test between two guests (its control channel is
# TCP, over a QEMU link between them); without a network device it stays idle.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
failover net_failover virtio_net
vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"
moddir=$work/kernel/lib/modules/$release
for m in $modules; do
    f=$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) | head -n1)
    if [ -z "$f" ]; then
        grep -q "/$m.ko\$" "$moddir/modules.builtin" 2>/dev/null && continue
        say "module $m not found in $pkg"; exit 1
    fi
    # busybox insmod takes plain .ko files only.
    case "$f" in
        *.xz) xz -dc "$f" > "$stage/lib/modules/$m.ko" ;;
        *.zst) zstd -dcq "$f" > "$stage/lib/modules/$m.ko" ;;
        *) cp "$f" "$stage/lib/modules/$m.ko" ;;
    esac
    echo "$m" >> "$stage/lib/modules/order"
done

cp /bin/busybox "$stage/bin/busybox"
# socat is dynamically linked: bring its libraries along, at the paths ldd names.
add_binary() {
    local bin; bin=$(command -v "$1")
    cp -L "$bin" "$stage/usr/bin/"
    ldd "$bin" | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }' | while read -r lib; do
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
}
add_binary socat

cat > "$stage/init" <<'INIT'
#!/bin/busybox sh
# PID 1: load the modules, run /guest/run.sh, report its status, power off.
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# Only emergencies on the console: kernel messages must not split the result lines.
dmesg -n 1
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || echo "GUEST: insmod $m failed"
done
read -r up _ < /proc/uptime
echo "GUEST-BOOTED uptime=${up}s kernel=$(uname -r)"
rc=99
if [ -f /guest/run.sh ]; then
    cd /guest && sh /guest/run.sh
    rc=$?
else
    echo "GUEST: no /guest/run.sh"
fi
echo "GUEST-EXIT-STATUS: $rc"
sync
poweroff -f
INIT
chmod 755 "$stage/init"

(cd "$stage" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) | gzip -6 > "$out/initramfs.cpio.gz.new"
mv "$out/initramfs.cpio.gz.new" "$out/initramfs.cpio.gz"
say "kernel $release; wrote $out/vmlinuz and $out/initramfs.cpio.gz"
