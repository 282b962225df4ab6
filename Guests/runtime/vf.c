#include "vf.h"

static struct vf_desc vf_tx_ring[VF_RING] __attribute__((aligned(4096)));
static struct vf_desc vf_rx_ring[VF_RING] __attribute__((aligned(4096)));

int vf_open(struct vf *v, unsigned index) {
    const struct sv_device *d = sv_find_device(SV_DEV_SRIOV_VF, index);
    if (!d) return -1;
    v->regs = (struct vf_regs *)d->base;
    v->tx = vf_tx_ring;
    v->rx = vf_rx_ring;
    v->tx_tail = v->rx_tail = v->rx_next = 0;
    v->regs->enable = 0;
    while (v->regs->tx_head != 0 || v->regs->rx_head != 0) sv_pause();
    v->regs->tx_ring = vf_dma_addr(v, vf_tx_ring);
    v->regs->rx_ring = vf_dma_addr(v, vf_rx_ring);
    v->regs->ring_size = VF_RING;
    v->regs->tx_tail = 0;
    v->regs->rx_tail = 0;
    __asm__ volatile("" ::: "memory");
    v->regs->enable = 1;
    return 0;
}

void vf_mac(struct vf *v, uint8_t mac[6]) {
    uint64_t m = v->regs->mac;
    for (int i = 0; i < 6; i++) mac[i] = (uint8_t)(m >> (8 * i));
}

uint16_t vf_send_at(struct vf *v, uint64_t addr, uint32_t len) {
    struct vf_desc *d = &v->tx[v->tx_tail % VF_RING];
    d->addr = addr;
    d->len = len;
    d->status = 0;
    __asm__ volatile("" ::: "memory");   /* descriptor before tail (x86 keeps store order) */
    v->regs->tx_tail = ++v->tx_tail;
    for (uint64_t i = 0; i < VF_SPIN_LIMIT; i++) {
        if (v->regs->tx_head == v->tx_tail) return d->status;
        if (v->regs->ring_fault) return 0;
        sv_pause();
    }
    return 0;
}

void vf_post_rx_at(struct vf *v, uint64_t addr, uint32_t cap) {
    struct vf_desc *d = &v->rx[v->rx_tail % VF_RING];
    d->addr = addr;
    d->len = cap;
    d->status = 0;
    __asm__ volatile("" ::: "memory");
    v->regs->rx_tail = ++v->rx_tail;
}

uint16_t vf_wait_rx(struct vf *v, uint32_t *len, uint64_t *addr, uint64_t spins) {
    for (uint64_t i = 0; i < spins; i++) {
        if (v->regs->rx_head != v->rx_next) {
            struct vf_desc *d = &v->rx[v->rx_next % VF_RING];
            v->rx_next++;
            if (len) *len = d->len;
            if (addr) *addr = d->addr;
            return d->status;
        }
        if (v->regs->ring_fault) return 0;
        sv_pause();
    }
    return 0;
}
