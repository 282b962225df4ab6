// summary: virtio-net: sends count=N frames and waits for each echo (resending until the peer answers); pong=1 echoes N distinct frames back
#include "virtio.h"

static uint8_t frame[1514], reply[1514];

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    int ping = sv_cmdline_u64("pong", 0) == 0;
    unsigned count = (unsigned)sv_cmdline_u64("count", 10);
    int irq = (int)sv_cmdline_u64("irq", 1);
    struct virtio_dev d;
    int r = virtio_net_open(&d, 0, irq);
    if (r) { sv_printf("net: no usable virtio-net device (%d)\n", r); return 2; }
    uint8_t mac[6];
    virtio_net_mac(&d, mac);
    sv_printf("net: %s, mac %02x:%02x:%02x:%02x:%02x:%02x\n", ping ? "ping" : "pong", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
    unsigned ok = 0;
    for (unsigned i = 0; i < count; i++) {
        if (ping) {
            memset(frame, 0xFF, 6);                 /* broadcast */
            memcpy(frame + 6, mac, 6);
            frame[12] = 0x88; frame[13] = 0xB5;     /* local experimental EtherType */
            memcpy(frame + 14, &i, sizeof i);
            /* The peer may not be listening yet (frames for a driver that is not ready are
             * dropped): resend until the echo comes, polling with a TSC deadline. */
            int got = 0;
            for (unsigned attempt = 0; attempt < 1000 && !got; attempt++) {
                if (i == 0 && attempt == 3)  /* some time without an answer: say what is missing */
                    sv_printf("net: no answer yet; waiting for a peer (a VM running 'net-ping pong=1' on the same switch)\n");
                if (virtio_net_send(&d, frame, 60)) { sv_printf("net: send failed\n"); return 3; }
                uint64_t deadline = sv_rdtsc() + 20000000;
                while (!got && sv_rdtsc() < deadline) {
                    int n = virtio_net_recv(&d, reply, sizeof reply, 0);
                    unsigned seq;
                    memcpy(&seq, reply + 14, sizeof seq);
                    got = n >= 18 && seq == i && memcmp(reply, mac, 6) == 0;
                }
            }
            if (got) ok++;
        } else {
            /* Echo everything (a resent frame too), count distinct sequence numbers. */
            static int seen_any;
            static unsigned last_seq;
            for (;;) {
                int n = virtio_net_recv(&d, frame, sizeof frame, 1);
                if (n < 18) continue;
                unsigned seq;
                memcpy(&seq, frame + 14, sizeof seq);
                memcpy(frame, frame + 6, 6);        /* back to the sender */
                memcpy(frame + 6, mac, 6);
                if (virtio_net_send(&d, frame, (uint32_t)n)) { sv_printf("net: send failed\n"); return 3; }
                if (!seen_any || seq != last_seq) { seen_any = 1; last_seq = seq; break; }
            }
            ok++;
        }
    }
    sv_printf("net: %s %u of %u frames\n", ping ? "echoed" : "answered", ok, count);
    return ok == count ? 0 : 1;
}
