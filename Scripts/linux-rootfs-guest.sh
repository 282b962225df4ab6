#!/usr/bin/env bash
# Builds on Scripts/linux-virtio-guest.sh: the same kernel and virtio initramfs, plus a raw
# ext4 disk image holding the busybox root (the plain initramfs's tree: busybox, /init,
# /etc/inittab), made with mke2fs -d from e2fsprogs. Booted with the virtio initramfs and
# `root=/dev/vda` on the command line, the initramfs's /init loads the virtio modules,
# mounts /dev/vda and switch_roots to it (Linux cannot mount vda itself: virtio_blk is a
# module). Prints linux-virtio-guest.sh's lines and:
#
#   rootfs=/…/rootfs.ext4
#
#   Scripts/linux-rootfs-guest.sh [--quiet]
#
# The image is the pristine copy: boot a copy of it (the guest writes to its root). It is
# rebuilt when the plain initramfs or this script is newer. e2fsprogs is installed with
# apt-get when mke2fs is missing and this runs as root; otherwise exit status 2 with a
# one-line message, as for the other failures.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=${LINUX_SCRATCH:-$repo/.build/linux}
paths=$("$repo/Scripts/linux-virtio-guest.sh" "$@") || exit $?
echo "$paths"
initrd=$(echo "$paths" | sed -n 's/^initrd=//p')
out=$scratch/rootfs.ext4
fail() { echo "linux-rootfs-guest.sh: $*" >&2; exit 2; }

mke2fs=$(command -v mke2fs || ls /sbin/mke2fs /usr/sbin/mke2fs 2>/dev/null | head -1)
if [ -z "$mke2fs" ]; then
    [ "$(id -u)" = 0 ] || fail "mke2fs is needed (install e2fsprogs: apt-get install e2fsprogs)"
    apt-get install -y -q e2fsprogs >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1; apt-get install -y -q e2fsprogs >/dev/null 2>&1; } \
        || fail "apt-get install e2fsprogs failed (mke2fs is needed)"
    mke2fs=$(command -v mke2fs || ls /sbin/mke2fs /usr/sbin/mke2fs 2>/dev/null | head -1)
    [ -n "$mke2fs" ] || fail "no mke2fs after installing e2fsprogs"
fi

if [ ! -f "$out" ] || [ "$out" -ot "$initrd" ] || [ "$out" -ot "$0" ]; then
    [ -x "$scratch/root/bin/busybox" ] || fail "no $scratch/root (run linux-guest.sh first)"
    # 32 MiB: busybox is 2 MB; the rest is room for what the guest writes. Owned by root
    # whoever builds it; no journal needed for a scratch root, but ext4 as Debian's kernel
    # has it built in.
    rm -f "$out.tmp"
    "$mke2fs" -q -F -t ext4 -L swiftvisor-root -E root_owner=0:0 -d "$scratch/root" "$out.tmp" 32M >/dev/null 2>&1 \
        || fail "mke2fs -d $scratch/root failed"
    mv "$out.tmp" "$out" || fail "writing $out failed"
fi
echo "rootfs=$out"
