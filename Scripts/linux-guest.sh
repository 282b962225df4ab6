#!/usr/bin/env bash
# Fetches Debian's cloud kernel (linux-image-cloud-amd64, the version its metapackage
# points at) and busybox-static with `apt-get download` (nothing is installed), unpacks
# them with dpkg-deb and builds an initramfs: a gzipped cpio (newc) archive holding
# busybox, an /init that mounts proc, sys and dev and starts busybox init, and an inittab
# with a shell on ttyS0. Prints the kernel and initramfs paths:
#
#   kernel=/…/vmlinuz-6.1.0-…-cloud-amd64
#   initrd=/…/initramfs.cpio.gz
#
#   Scripts/linux-guest.sh [--quiet]
#
# Environment: LINUX_SCRATCH (scratch directory; default .build/linux, git-ignored).
# Cached: a second run downloads and builds nothing. Exit status 2 when apt-get cannot
# fetch the packages (no network, not a Debian system).
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=${LINUX_SCRATCH:-$repo/.build/linux}
quiet=0
[ "${1:-}" = "--quiet" ] && quiet=1
log() { [ $quiet = 1 ] || echo "linux-guest.sh: $*" >&2; }
fail() { echo "linux-guest.sh: $*" >&2; exit 2; }

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || fail "apt-get and dpkg-deb are needed (a Debian system)"
command -v python3 >/dev/null || fail "python3 is needed to write the cpio archive"
mkdir -p "$scratch/debs" || fail "cannot create $scratch"

# Downloads package $1 into debs/ unless a .deb of it is already there; prints the file.
fetch() {
    local name=$1 found
    found=$(ls "$scratch/debs/${name}_"*.deb 2>/dev/null | head -1)
    if [ -z "$found" ]; then
        log "downloading $name"
        if ! (cd "$scratch/debs" && apt-get download -q "$name" >/dev/null 2>&1); then
            log "apt-get download $name failed; running apt-get update"
            apt-get update -qq >/dev/null 2>&1
            (cd "$scratch/debs" && apt-get download -q "$name" >/dev/null 2>&1) || fail "apt-get download $name failed"
        fi
        found=$(ls "$scratch/debs/${name}_"*.deb 2>/dev/null | head -1)
    fi
    [ -n "$found" ] || fail "no .deb for $name"
    echo "$found"
}

# The metapackage names the versioned image package (linux-image-6.1.0-…-cloud-amd64).
image_package=$(cat "$scratch/image-package" 2>/dev/null)
if [ -z "$image_package" ]; then
    meta=$(fetch linux-image-cloud-amd64) || exit 2
    image_package=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed 's/^ *//; s/ .*//' | grep '^linux-image-' | head -1)
    [ -n "$image_package" ] || fail "linux-image-cloud-amd64 names no linux-image package"
    echo "$image_package" > "$scratch/image-package"
fi
image_deb=$(fetch "$image_package") || exit 2
busybox_deb=$(fetch busybox-static) || exit 2

if [ ! -d "$scratch/kernel/boot" ]; then
    log "unpacking $(basename "$image_deb")"
    rm -rf "$scratch/kernel.tmp" && mkdir -p "$scratch/kernel.tmp"
    dpkg-deb -x "$image_deb" "$scratch/kernel.tmp" || fail "dpkg-deb -x $image_deb failed"
    rm -rf "$scratch/kernel" && mv "$scratch/kernel.tmp" "$scratch/kernel"
fi
kernel=$(ls "$scratch/kernel/boot/vmlinuz-"* 2>/dev/null | head -1)
[ -n "$kernel" ] || fail "no /boot/vmlinuz-* in $image_deb"

initrd=$scratch/initramfs.cpio.gz
# /init mounts the pseudo file systems and hands over to busybox init, whose inittab runs a
# shell on ttyS0 (a controlling tty: job control works) and lets `poweroff` power off.
init_script='#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "swiftvisor initramfs: $(uname -r)"
exec /sbin/init'
inittab='ttyS0::respawn:-/bin/sh
::shutdown:/bin/umount -a -r'
# A changed /init or inittab (a newer script) rebuilds the archive.
[ "$(cat "$scratch/root/init" 2>/dev/null)" = "$init_script" ] && [ "$(cat "$scratch/root/etc/inittab" 2>/dev/null)" = "$inittab" ] || rm -f "$initrd"
if [ ! -f "$initrd" ]; then
    log "building the initramfs"
    rm -rf "$scratch/busybox" "$scratch/root" && mkdir -p "$scratch/busybox" "$scratch/root"
    dpkg-deb -x "$busybox_deb" "$scratch/busybox" || fail "dpkg-deb -x $busybox_deb failed"
    mkdir -p "$scratch/root/bin" "$scratch/root/sbin" "$scratch/root/proc" "$scratch/root/sys" "$scratch/root/etc" \
             "$scratch/root/dev" "$scratch/root/tmp" "$scratch/root/root" "$scratch/root/usr/bin" "$scratch/root/usr/sbin"
    cp "$scratch/busybox/bin/busybox" "$scratch/root/bin/busybox" || fail "no bin/busybox in $busybox_deb"
    ln -s ../bin/busybox "$scratch/root/sbin/init"
    printf '%s\n' "$init_script" > "$scratch/root/init"
    printf '%s\n' "$inittab" > "$scratch/root/etc/inittab"
    chmod 755 "$scratch/root/init"
    # The cpio "newc" format: a 110-byte ASCII header per entry, name and data each padded
    # to 4 bytes, ended by TRAILER!!!. /dev/console exists before devtmpfs is mounted so
    # the kernel can open the initial console.
    python3 - "$scratch/root" "$scratch/initramfs.cpio" <<'EOF' || fail "writing the cpio archive failed"
import os, stat, sys
root, out = sys.argv[1], sys.argv[2]
entries = []
for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(dirnames + filenames):
        full = os.path.join(dirpath, name)
        entries.append((os.path.relpath(full, root), full))
ino = 1
def header(name, mode, size, rdevmajor=0, rdevminor=0, nlink=1):
    global ino
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevmajor, rdevminor, len(name) + 1, 0]
    ino += 1
    h = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    return h + b"\0" * (-len(h) % 4)
with open(out, "wb") as f:
    f.write(header("dev/console", stat.S_IFCHR | 0o600, 0, 5, 1))
    for rel, full in entries:
        st = os.lstat(full)
        if stat.S_ISDIR(st.st_mode):
            f.write(header(rel, stat.S_IFDIR | 0o755, 0, nlink=2)); continue
        data = os.readlink(full).encode() if stat.S_ISLNK(st.st_mode) else open(full, "rb").read()
        f.write(header(rel, st.st_mode, len(data)))
        f.write(data + b"\0" * (-len(data) % 4))
    f.write(header("TRAILER!!!", 0, 0))
EOF
    gzip -9 -f "$scratch/initramfs.cpio" || fail "gzip failed"
fi

echo "kernel=$kernel"
echo "initrd=$initrd"
