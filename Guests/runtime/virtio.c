/* virtio-mmio driver core and the block, net and console drivers (see virtio.h). */
#include "virtio.h"

enum {
    R_MAGIC = 0x000, R_VERSION = 0x004, R_DEVICE_ID = 0x008, R_DEVICE_FEATURES = 0x010, R_DEVICE_FEATURES_SEL = 0x014,
    R_DRIVER_FEATURES = 0x020, R_DRIVER_FEATURES_SEL = 0x024, R_QUEUE_SEL = 0x030, R_QUEUE_NUM_MAX = 0x034,
    R_QUEUE_NUM = 0x038, R_QUEUE_READY = 0x044, R_QUEUE_NOTIFY = 0x050, R_INTERRUPT_STATUS = 0x060,
    R_INTERRUPT_ACK = 0x064, R_STATUS = 0x070, R_QUEUE_DESC_LOW = 0x080, R_QUEUE_DESC_HIGH = 0x084,
    R_QUEUE_DRIVER_LOW = 0x090, R_QUEUE_DRIVER_HIGH = 0x094, R_QUEUE_DEVICE_LOW = 0x0A0, R_QUEUE_DEVICE_HIGH = 0x0A4,
    R_CONFIG = 0x100,
};
enum { S_ACKNOWLEDGE = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8, S_FAILED = 128 };
#define VIRTIO_F_VERSION_1 (1ull << 32)

static uint32_t rd(struct virtio_dev *d, unsigned r) { return sv_mmio_read32(d->base + r); }
static void wr(struct virtio_dev *d, unsigned r, uint32_t v) { sv_mmio_write32(d->base + r, v); }

/* Queue storage: enough for a few devices per guest. */
#define VQ_POOL 8
static unsigned vq_used_count;

/* Confidential VMs (docs/confidential-vm.md): devices reach only the shared region, so the
 * queues live there and every buffer is bounced through it — device-readable bytes copied
 * in when a chain is added, device-written bytes copied back when it is used. What the
 * driver needs to trust (which guest buffer a descriptor stands for) stays private. */
struct bounce_slot { void *orig; uint8_t *shared; uint32_t cap, len; int device_writes; int next; };
static struct virtq *queues[VQ_POOL];
/* The private queue pool, or (confidential: the queues are in the shared region) the bounce
 * records — one storage, so the runtime's footprint is the same either way. */
static union {
    struct virtq queues[VQ_POOL];
    struct bounce_slot slots[VQ_POOL][VQ_SIZE];
} pool __attribute__((aligned(4096)));
_Static_assert(sizeof(struct bounce_slot[VQ_POOL][VQ_SIZE]) <= sizeof(struct virtq[VQ_POOL]), "bounce records fit the queue pool");
#define vq_pool pool.queues
#define bounces pool.slots

static unsigned queue_index(const struct virtq *q) {
    for (unsigned i = 0; i < vq_used_count; i++) if (queues[i] == q) return i;
    return 0;
}

static void on_virtio_irq(unsigned irq, void *ctx) {
    struct virtio_dev *d = ctx;
    (void)irq;
    d->interrupts++;
    uint32_t s = rd(d, R_INTERRUPT_STATUS);
    if (s) wr(d, R_INTERRUPT_ACK, s);   /* ack first: later completions raise a new edge */
}

static int setup_queue(struct virtio_dev *d, unsigned i) {
    if (vq_used_count >= VQ_POOL) return -4;
    wr(d, R_QUEUE_SEL, i);
    uint32_t max = rd(d, R_QUEUE_NUM_MAX);
    if (max == 0 || rd(d, R_QUEUE_READY)) return -4;
    struct virtq *q = sv_confidential() ? sv_shared_alloc(sizeof *q, 4096) : &vq_pool[vq_used_count];
    if (!q) return -4;
    queues[vq_used_count++] = q;
    memset(q, 0, sizeof *q);
    q->size = max < VQ_SIZE ? (uint16_t)max : VQ_SIZE;
    for (uint16_t k = 0; k < q->size; k++) q->desc[k].next = (uint16_t)(k + 1);
    q->num_free = q->size;
    wr(d, R_QUEUE_NUM, q->size);
    uint64_t desc = (uint64_t)q->desc, avail = (uint64_t)&q->avail, used = (uint64_t)&q->used;
    wr(d, R_QUEUE_DESC_LOW, (uint32_t)desc); wr(d, R_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    wr(d, R_QUEUE_DRIVER_LOW, (uint32_t)avail); wr(d, R_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    wr(d, R_QUEUE_DEVICE_LOW, (uint32_t)used); wr(d, R_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    wr(d, R_QUEUE_READY, 1);
    d->q[i] = q;
    return 0;
}

int virtio_open(struct virtio_dev *d, uint32_t device_id, unsigned n, uint64_t wanted, unsigned nqueues, int use_interrupts) {
    memset(d, 0, sizeof *d);
    const struct sv_device *bd = 0;
    for (unsigned k = 0;; k++) {
        bd = sv_find_device(SV_DEV_VIRTIO_MMIO, k);
        if (!bd) return -1;
        if (sv_mmio_read32(bd->base + R_DEVICE_ID) == device_id && n-- == 0) break;
    }
    d->base = bd->base;
    d->irq = bd->irq;
    d->device_id = device_id;
    if (rd(d, R_MAGIC) != 0x74726976 || rd(d, R_VERSION) != 2) return -2;
    wr(d, R_STATUS, 0);  /* reset */
    wr(d, R_STATUS, S_ACKNOWLEDGE);
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(d, R_DEVICE_FEATURES_SEL, 0);
    uint64_t offered = rd(d, R_DEVICE_FEATURES);
    wr(d, R_DEVICE_FEATURES_SEL, 1);
    offered |= (uint64_t)rd(d, R_DEVICE_FEATURES) << 32;
    uint64_t take = offered & (wanted | VIRTIO_F_VERSION_1);
    if (!(take & VIRTIO_F_VERSION_1)) { wr(d, R_STATUS, S_FAILED); return -3; }
    wr(d, R_DRIVER_FEATURES_SEL, 0); wr(d, R_DRIVER_FEATURES, (uint32_t)take);
    wr(d, R_DRIVER_FEATURES_SEL, 1); wr(d, R_DRIVER_FEATURES, (uint32_t)(take >> 32));
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(rd(d, R_STATUS) & S_FEATURES_OK)) { wr(d, R_STATUS, S_FAILED); return -3; }
    d->features = take;
    for (unsigned i = 0; i < nqueues && i < 3; i++) {
        int r = setup_queue(d, i);
        if (r) { wr(d, R_STATUS, S_FAILED); return r; }
    }
    d->nqueues = nqueues;
    d->use_interrupts = use_interrupts;
    if (use_interrupts) sv_irq_register(d->irq, on_virtio_irq, d);
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return 0;
}

uint32_t virtio_status(struct virtio_dev *d) { return rd(d, R_STATUS); }
uint32_t virtio_config_read32(struct virtio_dev *d, unsigned offset) { return rd(d, R_CONFIG + offset); }
uint8_t virtio_config_read8(struct virtio_dev *d, unsigned offset) { return sv_mmio_read8(d->base + R_CONFIG + offset); }

int virtq_add(struct virtq *q, const struct virtio_buf *bufs, unsigned n, void *cookie) {
    if (n == 0 || n > q->num_free) return -1;
    uint16_t head = q->free_head, i = head, last = head;
    int bounced = sv_confidential();
    struct bounce_slot *slots = bounces[queue_index(q)];
    for (unsigned k = 0; k < n; k++) {
        struct vring_desc *dsc = &q->desc[i];
        if (i >= q->size) return -1;
        dsc->addr = (uint64_t)bufs[k].addr;
        if (bounced) {
            struct bounce_slot *b = &slots[i];
            if (b->cap < bufs[k].len) {
                uint32_t cap = (bufs[k].len + 63) & ~63u;
                if (!(b->shared = sv_shared_alloc(cap, 64))) return -1;
                b->cap = cap;
            }
            b->orig = (void *)bufs[k].addr;
            b->len = bufs[k].len;
            b->device_writes = bufs[k].device_writes;
            b->next = -1;
            if (k > 0) slots[last].next = i;
            if (!b->device_writes) memcpy(b->shared, b->orig, b->len);
            dsc->addr = (uint64_t)b->shared;
        }
        dsc->len = bufs[k].len;
        dsc->flags = (uint16_t)((bufs[k].device_writes ? VRING_DESC_F_WRITE : 0) | (k + 1 < n ? VRING_DESC_F_NEXT : 0));
        last = i;
        i = dsc->next;
    }
    q->free_head = q->desc[last].next;
    q->num_free = (uint16_t)(q->num_free - n);
    q->cookie[head] = cookie;
    q->avail.ring[q->avail.idx % q->size] = head;
    __asm__ volatile("" ::: "memory");  /* x86 keeps stores in order; stop the compiler reordering */
    q->avail.idx++;
    return head;
}

void virtio_notify(struct virtio_dev *d, unsigned queue) {
    __asm__ volatile("" ::: "memory");
    d->notifies++;
    wr(d, R_QUEUE_NOTIFY, queue);
}

void *virtq_get_used(struct virtq *q, uint32_t *len) {
    volatile uint16_t *idx = &q->used.idx;
    if (*idx == q->last_used) return 0;
    __asm__ volatile("" ::: "memory");
    struct vring_used_elem e = q->used.ring[q->last_used % q->size];
    q->last_used++;
    if (e.id >= q->size) return 0;
    if (len) *len = e.len;
    if (sv_confidential()) {
        /* Copy back what the device wrote, following the chain as the driver made it. */
        struct bounce_slot *slots = bounces[queue_index(q)];
        for (int k = (int)e.id, steps = 0; k >= 0 && steps < VQ_SIZE; k = slots[k].next, steps++)
            if (slots[k].device_writes) memcpy(slots[k].orig, slots[k].shared, slots[k].len);
    }
    void *cookie = q->cookie[e.id];
    /* Return the chain to the free list. */
    uint16_t i = (uint16_t)e.id, n = 1;
    while (q->desc[i].flags & VRING_DESC_F_NEXT) { i = q->desc[i].next; n++; }
    q->desc[i].next = q->free_head;
    q->free_head = (uint16_t)e.id;
    q->num_free = (uint16_t)(q->num_free + n);
    return cookie;
}

void virtio_wait_used(struct virtio_dev *d, unsigned queue) {
    volatile uint16_t *idx = &d->q[queue]->used.idx;
    if (!d->use_interrupts) {
        while (*idx == d->q[queue]->last_used) sv_pause();
        return;
    }
    /* Check with interrupts off, then sleep: a completion in between leaves its interrupt
     * pending, and STI;HLT takes it. */
    sv_irq_disable();
    while (*idx == d->q[queue]->last_used) sv_wait_for_interrupt();
}

/* ---- block ---- */

struct blk_req { uint32_t type, reserved; uint64_t sector; };
#define VIRTIO_BLK_F_RO (1ull << 5)
#define VIRTIO_BLK_F_FLUSH (1ull << 9)

uint64_t virtio_blk_capacity(struct virtio_dev *d) {
    return (uint64_t)virtio_config_read32(d, 0) | (uint64_t)virtio_config_read32(d, 4) << 32;
}

int virtio_blk_read_only(struct virtio_dev *d) { return (d->features & VIRTIO_BLK_F_RO) != 0; }

static int blk_request(struct virtio_dev *d, uint32_t type, uint64_t sector, void *buf, uint32_t bytes) {
    struct blk_req req = { type, 0, sector };
    volatile uint8_t status = 0xFF;
    struct virtio_buf bufs[3] = { { &req, sizeof req, 0 }, { buf, bytes, type == 0 }, { (const void *)&status, 1, 1 } };
    unsigned n = 3;
    if (bytes == 0) { bufs[1] = bufs[2]; n = 2; }
    int head = virtq_add(d->q[0], bufs, n, (void *)&req);
    if (head < 0) return -1;
    uint64_t interrupts_before = d->interrupts;
    virtio_notify(d, 0);
    void *done;
    do {
        virtio_wait_used(d, 0);
        done = virtq_get_used(d->q[0], 0);
    } while (done != (void *)&req);
    /* The device interrupts once per completed request. Whether the completion was seen
     * before or after it is a matter of device timing (a VMM that completes inside the
     * notify, one with an I/O thread), so wait for it too: the request then ends the same
     * way on every engine. */
    if (d->use_interrupts) {
        sv_irq_disable();
        while (d->interrupts == interrupts_before) sv_wait_for_interrupt();
    }
    return status;
}

int virtio_blk_read(struct virtio_dev *d, uint64_t sector, void *buf, uint32_t sectors) {
    return blk_request(d, 0, sector, buf, sectors * 512);
}
int virtio_blk_write(struct virtio_dev *d, uint64_t sector, const void *buf, uint32_t sectors) {
    return blk_request(d, 1, sector, (void *)buf, sectors * 512);
}
int virtio_blk_flush(struct virtio_dev *d) { return blk_request(d, 4, 0, 0, 0); }

/* ---- net ---- */

#define VIRTIO_NET_F_MAC (1ull << 5)
#define NET_HDR 12
#define NET_BUF 1536
#define NET_RX_BUFS 16
static uint8_t net_rx[2][NET_RX_BUFS][NET_BUF] __attribute__((aligned(64)));
static uint8_t net_tx[2][NET_BUF] __attribute__((aligned(64)));
static unsigned net_opened;

static void net_post_rx(struct virtio_dev *d, uint8_t *b) {
    struct virtio_buf buf = { b, NET_BUF, 1 };
    virtq_add(d->q[0], &buf, 1, b);
}

int virtio_net_open(struct virtio_dev *d, unsigned n, int use_interrupts) {
    if (net_opened >= 2) return -4;
    int r = virtio_open(d, VIRTIO_ID_NET, n, VIRTIO_NET_F_MAC, 2, use_interrupts);
    if (r) return r;
    d->net_slot = net_opened++;
    for (unsigned i = 0; i < NET_RX_BUFS; i++) net_post_rx(d, net_rx[d->net_slot][i]);
    virtio_notify(d, 0);
    return 0;
}

void virtio_net_mac(struct virtio_dev *d, uint8_t mac[6]) {
    for (unsigned i = 0; i < 6; i++) mac[i] = virtio_config_read8(d, i);
}

int virtio_net_send(struct virtio_dev *d, const void *frame, uint32_t len) {
    if (len > NET_BUF - NET_HDR) return -1;
    uint8_t *b = net_tx[d->net_slot];
    memset(b, 0, NET_HDR);
    memcpy(b + NET_HDR, frame, len);
    struct virtio_buf buf = { b, NET_HDR + len, 0 };
    if (virtq_add(d->q[1], &buf, 1, b) < 0) return -1;
    virtio_notify(d, 1);
    while (!virtq_get_used(d->q[1], 0)) virtio_wait_used(d, 1);
    return 0;
}

int virtio_net_recv(struct virtio_dev *d, void *buf, uint32_t cap, int wait) {
    uint32_t len;
    uint8_t *b;
    while (!(b = virtq_get_used(d->q[0], &len))) {
        if (!wait) return -1;
        virtio_wait_used(d, 0);
    }
    int n = -1;
    if (len >= NET_HDR) {
        n = (int)(len - NET_HDR < cap ? len - NET_HDR : cap);
        memcpy(buf, b + NET_HDR, (size_t)n);
    }
    net_post_rx(d, b);
    virtio_notify(d, 0);
    return n;
}

/* ---- console ---- */

int virtio_console_write(struct virtio_dev *d, const void *bytes, uint32_t len) {
    struct virtio_buf buf = { bytes, len, 0 };
    if (virtq_add(d->q[1], &buf, 1, (void *)bytes) < 0) return -1;
    virtio_notify(d, 1);
    while (!virtq_get_used(d->q[1], 0)) virtio_wait_used(d, 1);
    return 0;
}

static uint8_t console_rx[64] __attribute__((aligned(64)));
static uint32_t console_rx_pos, console_rx_len;  /* bytes received but not yet returned */

unsigned virtio_console_read_line(struct virtio_dev *d, char *buf, unsigned cap) {
    unsigned n = 0;
    while (n < cap) {
        if (console_rx_pos == console_rx_len) {
            struct virtio_buf b = { console_rx, sizeof console_rx, 1 };
            if (virtq_add(d->q[0], &b, 1, console_rx) < 0) return n;
            virtio_notify(d, 0);
            uint32_t len = 0;
            while (!virtq_get_used(d->q[0], &len)) virtio_wait_used(d, 0);
            if (len == 0) return n;
            console_rx_pos = 0;
            console_rx_len = len > sizeof console_rx ? sizeof console_rx : len;
        }
        char c = (char)console_rx[console_rx_pos++];
        buf[n++] = c;
        if (c == '\n') return n;
    }
    return n;
}
