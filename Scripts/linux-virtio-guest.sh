#!/usr/bin/env bash
# Builds on Scripts/linux-guest.sh: the same kernel and initramfs, plus a second initramfs
# that also carries the kernel's virtio-pci modules (virtio_pci, virtio_blk, virtio_net,
# virtio_console and what they depend on, from the same linux-image .deb) and an /init
# that loads them before running the plain initramfs's /init, or, when the command line
# says root=/dev/vdX, mounts that disk (ext4) and switch_roots to its /init. Debian's cloud kernel builds
# them as modules, so a disk or NIC on virtio-pci needs them loaded. Prints:
#
#   kernel=/…/vmlinuz-…-cloud-amd64
#   initrd=/…/initramfs.cpio.gz
#   virtio_initrd=/…/initramfs-virtio.cpio.gz
#
#   Scripts/linux-virtio-guest.sh [--quiet]
#
# The second archive is the first with a gzipped cpio appended (the kernel unpacks
# concatenated archives in order, later files replacing earlier ones). Same environment,
# caching and exit status as linux-guest.sh.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=${LINUX_SCRATCH:-$repo/.build/linux}
paths=$("$repo/Scripts/linux-guest.sh" "$@") || exit $?
echo "$paths"
kernel=$(echo "$paths" | sed -n 's/^kernel=//p')
initrd=$(echo "$paths" | sed -n 's/^initrd=//p')
out=$scratch/initramfs-virtio.cpio.gz
fail() { echo "linux-virtio-guest.sh: $*" >&2; exit 2; }

# Rebuilt when the plain initramfs or this script (its /init) is newer.
if [ ! -f "$out" ] || [ "$out" -ot "$initrd" ] || [ "$out" -ot "$0" ]; then
    modules=$(ls -d "$scratch/kernel/lib/modules/"*/kernel 2>/dev/null | head -1)
    [ -n "$modules" ] || fail "no lib/modules in the unpacked kernel package"
    extra=$scratch/virtio-extra && rm -rf "$extra" && mkdir -p "$extra/lib/modules/virtio"
    # In dependency order (each module's modinfo "depends=").
    order="net/core/failover drivers/net/net_failover drivers/virtio/virtio_ring drivers/virtio/virtio
           drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci
           drivers/block/virtio_blk drivers/net/virtio_net drivers/char/virtio_console"
    names=""
    for m in $order; do
        f=$(ls "$modules/$m.ko"* 2>/dev/null | head -1)
        [ -n "$f" ] || fail "no $m.ko in the kernel package"
        case "$f" in
            *.ko) cp "$f" "$extra/lib/modules/virtio/" ;;
            *.ko.xz) xz -dc "$f" > "$extra/lib/modules/virtio/$(basename "$m").ko" || fail "xz -d $f failed" ;;
            *.ko.zst) zstd -qdc "$f" > "$extra/lib/modules/virtio/$(basename "$m").ko" || fail "zstd -d $f failed" ;;
            *) fail "unknown module format: $f" ;;
        esac
        names="$names $(basename "$m")"
    done
    # The plain /init, kept as /init.base, runs after the modules are in. Each module
    # loaded is announced in the kernel log, which reaches the serial console.
    cp "$scratch/root/init" "$extra/init.base" || fail "no $scratch/root/init (run linux-guest.sh first)"
    cat > "$extra/init" <<INIT
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in$names; do
    /bin/busybox insmod /lib/modules/virtio/\$m.ko || echo "swiftvisor-init: insmod \$m failed" > /dev/kmsg
done
# sysfs only for the listing: the plain /init mounts it again.
/bin/busybox mount -t sysfs sysfs /sys
for n in \$(/bin/busybox ls /sys/class/net); do echo "swiftvisor-init: network interface \$n" > /dev/kmsg; done
/bin/busybox umount /sys
# root=/dev/vda (linux-rootfs-guest.sh's disk): the root file system is the virtio disk,
# mounted here now that virtio_blk is in; its own /init then runs as PID 1.
/bin/busybox mount -t proc proc /proc
root=\$(/bin/busybox sed -n 's/.*root=\\(\/dev\/vd[a-z]*\\).*/\\1/p' /proc/cmdline)
/bin/busybox umount /proc
if [ -n "\$root" ]; then
    /bin/busybox mkdir -p /newroot
    if /bin/busybox mount -t ext4 "\$root" /newroot; then
        echo "swiftvisor-init: switching root to \$root" > /dev/kmsg
        /bin/busybox mount --move /dev /newroot/dev
        exec /bin/busybox switch_root /newroot /init
    fi
    echo "swiftvisor-init: cannot mount \$root; staying in the initramfs" > /dev/kmsg
fi
exec /init.base
INIT
    chmod 755 "$extra/init" "$extra/init.base"
    python3 - "$extra" "$scratch/virtio-extra.cpio" <<'PY' || fail "writing the cpio archive failed"
import os, stat, sys
root, out = sys.argv[1], sys.argv[2]
records = []
for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(dirnames) + sorted(filenames):
        records.append(os.path.join(dirpath, name))
def entry(number, name, mode, data):
    # newc: magic, then 13 eight-digit hex fields (ino, mode, uid, gid, nlink, mtime,
    # filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check).
    fields = [number, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)
with open(out, "wb") as f:
    for number, full in enumerate(records, start=0x10000):
        st = os.lstat(full)
        data = b"" if stat.S_ISDIR(st.st_mode) else open(full, "rb").read()
        f.write(entry(number, os.path.relpath(full, root), st.st_mode, data))
    f.write(entry(0, "TRAILER!!!", 0, b""))
PY
    gzip -9 -c "$scratch/virtio-extra.cpio" > "$scratch/virtio-extra.cpio.gz" || fail "gzip failed"
    cat "$initrd" "$scratch/virtio-extra.cpio.gz" > "$out.tmp" && mv "$out.tmp" "$out" || fail "writing $out failed"
fi
echo "virtio_initrd=$out"
