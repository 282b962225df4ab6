// summary: virtio-blk: prints the disk's first sector, writes a line to sector 1 (sector=N), flushes and reads it back; irq=0 polls
#include "virtio.h"

static uint8_t sector_buf[512] __attribute__((aligned(512)));
static uint8_t check_buf[512] __attribute__((aligned(512)));

static void print_text(const uint8_t *b, unsigned n) {
    for (unsigned i = 0; i < n && b[i]; i++) {
        if (b[i] == '\n') break;
        sv_putc(b[i] >= 32 && b[i] < 127 ? (char)b[i] : '.');
    }
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    int irq = (int)sv_cmdline_u64("irq", 1);
    uint64_t target = sv_cmdline_u64("sector", 1);
    struct virtio_dev d;
    int r = virtio_open(&d, VIRTIO_ID_BLOCK, 0, (1ull << 5) | (1ull << 9), 1, irq);
    if (r) { sv_printf("disk: no usable virtio-blk device (%d)\n", r); return 2; }
    uint64_t cap = virtio_blk_capacity(&d);
    sv_printf("disk: %llu sectors%s, %s\n", (unsigned long long)cap, virtio_blk_read_only(&d) ? ", read-only" : "",
              irq ? "interrupts" : "polling");
    if ((r = virtio_blk_read(&d, 0, sector_buf, 1)) != 0) { sv_printf("disk: read failed (%d)\n", r); return 3; }
    sv_puts("disk: sector 0: ");
    print_text(sector_buf, sizeof sector_buf);
    sv_putc('\n');

    memset(sector_buf, 0, sizeof sector_buf);
    const char msg[] = "written by the disk guest through virtio-blk\n";
    memcpy(sector_buf, msg, sizeof msg - 1);
    r = virtio_blk_write(&d, target, sector_buf, 1);
    if (virtio_blk_read_only(&d)) {
        sv_printf("disk: write to a read-only disk %s\n", r == 1 ? "refused (IOERR)" : "NOT refused");
        return r == 1 ? 0 : 4;
    }
    if (r) { sv_printf("disk: write failed (%d)\n", r); return 4; }
    if ((r = virtio_blk_flush(&d)) != 0) { sv_printf("disk: flush failed (%d)\n", r); return 5; }
    if ((r = virtio_blk_read(&d, target, check_buf, 1)) != 0 || memcmp(check_buf, sector_buf, 512) != 0) {
        sv_printf("disk: read-back mismatch (%d)\n", r);
        return 6;
    }
    r = virtio_blk_read(&d, cap, check_buf, 1);
    sv_printf("disk: reading past the end is refused, as it should be (status %d)\n", r);
    sv_printf("disk: wrote, flushed and read back sector %llu (%llu notifies, %llu interrupts)\n",
              (unsigned long long)target, (unsigned long long)d.notifies, (unsigned long long)d.interrupts);
    return 0;
}
