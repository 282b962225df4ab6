/* Driver for an SR-IOV virtual function (SV_DEV_SRIOV_VF; Sources/Devices/SRIOV/SRIOVNIC.swift).
 * The VF's registers are a page of RAM mapped into the guest: sending and receiving
 * never exit. Rings and buffers are reached by the device's DMA through the VF's IOMMU
 * domain; device addresses are guest-physical + the published dma_base. */
#ifndef SV_VF_H
#define SV_VF_H
#include "sv.h"

struct vf_regs {
    volatile uint64_t mac, dma_base, tx_ring, rx_ring;
    volatile uint32_t ring_size, enable, tx_tail, tx_head, rx_tail, rx_head;
    volatile uint32_t tx_errors, rx_errors, rx_dropped, vf_index, ring_fault;
};

struct vf_desc { uint64_t addr; uint32_t len; volatile uint16_t status; uint16_t reserved; };
#define VF_DONE 1
#define VF_DMA_ERROR 2
#define VF_TRUNCATED 4
#define VF_RING 64

struct vf {
    struct vf_regs *regs;
    struct vf_desc *tx, *rx;
    uint32_t tx_tail, rx_tail, rx_next;
};

int vf_open(struct vf *v, unsigned index);   /* 0, or -1 when absent */
void vf_mac(struct vf *v, uint8_t mac[6]);
/* Device address of a guest-physical address. */
static inline uint64_t vf_dma_addr(struct vf *v, const void *p) { return (uint64_t)(uintptr_t)p + v->regs->dma_base; }
/* Queues a transmit of `len` bytes at device address `addr`; waits for completion and
 * returns the descriptor status (0 on timeout). */
uint16_t vf_send_at(struct vf *v, uint64_t addr, uint32_t len);
static inline uint16_t vf_send(struct vf *v, const void *frame, uint32_t len) { return vf_send_at(v, vf_dma_addr(v, frame), len); }
/* Posts a receive buffer at device address `addr`. */
void vf_post_rx_at(struct vf *v, uint64_t addr, uint32_t cap);
/* Waits up to `spins` polls for the next receive completion: its status (0 on timeout),
 * its length and the buffer's device address. */
uint16_t vf_wait_rx(struct vf *v, uint32_t *len, uint64_t *addr, uint64_t spins);
#define VF_SPIN_LIMIT 400000000ull
#endif
