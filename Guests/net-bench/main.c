// summary: S2 packet workload at CPL3: count=N frames of size=S bytes sent over the emulated NIC (nic=1) or virtio-net in batches of batch=B
#include "nic.h"
#include "virtio.h"

#define MAX_BATCH 32
static uint8_t frames[MAX_BATCH][1536] __attribute__((aligned(64)));

struct job { uint64_t count, size, batch, sent; int use_nic; struct nic nic; struct virtio_dev vd; int err; };

static void fill(uint8_t *f, const uint8_t mac[6], uint64_t seq, uint64_t size) {
    memset(f, 0xFF, 6);
    memcpy(f + 6, mac, 6);
    f[12] = 0x88; f[13] = 0xB5;
    memcpy(f + 14, &seq, sizeof seq);
    for (uint64_t i = 22; i < size; i++) f[i] = (uint8_t)(i + seq);
}

static void workload(void *arg) {
    struct job *j = arg;
    uint8_t mac[6];
    if (j->use_nic) {
        nic_mac(&j->nic, mac);
        for (uint64_t i = 0; i < j->count; i++) {
            fill(frames[0], mac, i, j->size);
            if (nic_send(&j->nic, frames[0], (uint32_t)j->size)) { j->err = 1; return; }
            j->sent++;
        }
        return;
    }
    virtio_net_mac(&j->vd, mac);
    struct virtq *tx = j->vd.q[1];
    const uint32_t hdr = 12;
    for (uint64_t i = 0; i < j->count;) {
        /* A batch: add up to `batch` chains, one notify, then reclaim them. */
        uint64_t n = 0;
        for (; n < j->batch && i + n < j->count; n++) {
            uint8_t *b = frames[n];
            memset(b, 0, hdr);
            fill(b + hdr, mac, i + n, j->size);
            struct virtio_buf buf = { b, (uint32_t)(hdr + j->size), 0 };
            if (virtq_add(tx, &buf, 1, b) < 0) { j->err = 2; return; }
        }
        virtio_notify(&j->vd, 1);
        for (uint64_t done = 0; done < n;) {
            if (virtq_get_used(tx, 0)) done++;
            else sv_pause();
        }
        i += n;
        j->sent += n;
    }
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    static struct job j;
    j.count = sv_cmdline_u64("count", 10000);
    j.size = sv_cmdline_u64("size", 256);
    j.batch = sv_cmdline_u64("batch", MAX_BATCH);
    j.use_nic = (int)sv_cmdline_u64("nic", 0);
    if (j.size < 22 || j.size > 1514 || j.batch == 0 || j.batch > MAX_BATCH) { sv_printf("net-bench: bad size or batch\n"); return 2; }
    if (j.use_nic ? nic_open(&j.nic, 0) : virtio_net_open(&j.vd, 0, 0)) { sv_printf("net-bench: no %s\n", j.use_nic ? "emulated NIC" : "virtio-net"); return 2; }
    sv_mark(1);
    sv_run_user(workload, &j);
    sv_mark(2);
    if (j.err) { sv_printf("net-bench: device error %d\n", j.err); return 3; }
    sv_printf("net-bench: %s sent %llu frames of %llu bytes\n", j.use_nic ? "emulated NIC" : "virtio-net",
              (unsigned long long)j.sent, (unsigned long long)j.size);
    return 0;
}
