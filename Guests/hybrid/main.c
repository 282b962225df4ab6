// summary: S3 hybrid: UART console + virtio-blk + virtio-net at once — sends the disk's first sector over the net, stores the echo in sector 2
#include "virtio.h"

static uint8_t sector[512] __attribute__((aligned(512)));
static uint8_t frame[1514], reply[1514];

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    int irq = (int)sv_cmdline_u64("irq", 1);
    struct virtio_dev blk, net;
    int r = virtio_open(&blk, VIRTIO_ID_BLOCK, 0, 1ull << 9, 1, irq);
    if (r) { sv_printf("hybrid: no virtio-blk (%d)\n", r); return 2; }
    if ((r = virtio_net_open(&net, 0, irq)) != 0) { sv_printf("hybrid: no virtio-net (%d)\n", r); return 2; }
    sv_printf("hybrid: uart, virtio-blk (%llu sectors), virtio-net ready\n", (unsigned long long)virtio_blk_capacity(&blk));
    if (virtio_blk_read(&blk, 0, sector, 1)) { sv_printf("hybrid: disk read failed\n"); return 3; }
    uint8_t mac[6];
    virtio_net_mac(&net, mac);
    memset(frame, 0xFF, 6);
    memcpy(frame + 6, mac, 6);
    frame[12] = 0x88; frame[13] = 0xB5;
    memcpy(frame + 14, sector, 64);
    /* Resend until the peer's echo arrives (it may not be listening yet). */
    int n = -1;
    for (unsigned attempt = 0; attempt < 1000 && n < 0; attempt++) {
        if (virtio_net_send(&net, frame, 14 + 64)) { sv_printf("hybrid: send failed\n"); return 3; }
        uint64_t deadline = sv_rdtsc() + 20000000;
        while (n < 0 && sv_rdtsc() < deadline) {
            n = virtio_net_recv(&net, reply, sizeof reply, 0);
            if (n >= 0 && memcmp(reply, mac, 6) != 0) n = -1;  /* not for us */
        }
    }
    sv_printf("hybrid: sent 64 bytes of sector 0 to the network\n");
    if (n < 14 + 64 || memcmp(reply + 14, sector, 64) != 0) { sv_printf("hybrid: bad echo (%d bytes)\n", n); return 4; }
    memcpy(frame, reply, sizeof reply);
    memset(sector, 0, sizeof sector);
    memcpy(sector, frame + 14, 64);
    if (virtio_blk_write(&blk, 2, sector, 1) || virtio_blk_flush(&blk)) { sv_printf("hybrid: disk write failed\n"); return 5; }
    sv_printf("hybrid: echo received and stored in sector 2\n");
    return 0;
}
