#include "nic.h"

enum { ID = 0x00, MAC_LO = 0x04, MAC_HI = 0x08, TX_LO = 0x10, TX_HI = 0x14, TX_LEN = 0x18, TX_CMD = 0x1C,
       STATUS = 0x20, RX_LO = 0x30, RX_HI = 0x34, RX_CAP = 0x38, RX_CMD = 0x3C, RX_LEN = 0x40 };
enum { TX_DONE = 1, RX_READY = 2, ERROR = 4 };

int nic_open(struct nic *n, unsigned index) {
    const struct sv_device *d = sv_find_device(SV_DEV_EMULATED_NIC, index);
    if (!d || sv_mmio_read32(d->base + ID) != 0x3143494E) return -1;
    n->base = d->base;
    n->irq = d->irq;
    return 0;
}

void nic_mac(struct nic *n, uint8_t mac[6]) {
    uint32_t lo = sv_mmio_read32(n->base + MAC_LO), hi = sv_mmio_read32(n->base + MAC_HI);
    for (int i = 0; i < 4; i++) mac[i] = (uint8_t)(lo >> (8 * i));
    mac[4] = (uint8_t)hi; mac[5] = (uint8_t)(hi >> 8);
}

int nic_send(struct nic *n, const void *frame, uint32_t len) {
    uint64_t a = (uint64_t)frame;
    sv_mmio_write32(n->base + TX_LO, (uint32_t)a);
    sv_mmio_write32(n->base + TX_HI, (uint32_t)(a >> 32));
    sv_mmio_write32(n->base + TX_LEN, len);
    sv_mmio_write32(n->base + TX_CMD, 1);
    uint32_t s;
    while (!((s = sv_mmio_read32(n->base + STATUS)) & (TX_DONE | ERROR))) sv_pause();
    return s & ERROR ? -1 : 0;
}

int nic_recv(struct nic *n, void *buf, uint32_t cap) {
    if (!(sv_mmio_read32(n->base + STATUS) & RX_READY)) return -1;
    uint64_t a = (uint64_t)buf;
    sv_mmio_write32(n->base + RX_LO, (uint32_t)a);
    sv_mmio_write32(n->base + RX_HI, (uint32_t)(a >> 32));
    sv_mmio_write32(n->base + RX_CAP, cap);
    sv_mmio_write32(n->base + RX_CMD, 1);
    return (int)sv_mmio_read32(n->base + RX_LEN);
}
