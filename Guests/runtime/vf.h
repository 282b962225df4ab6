/* Driver for an SR-IOV virtual function (Sources/Devices/SRIOV/SRIOVNIC.swift,
 * AssignedVirtualFunction.swift). The VF is a PCI function of the VM's bus, found through
 * configuration mechanism #1 (0xCF8/0xCFC). Its BAR0 is the register page: RAM mapped into
 * the guest, so sending and receiving never exit. BAR2 holds its MSI-X table (trapped).
 * Rings and buffers are reached by the device's DMA through the VF's IOMMU domain; device
 * addresses are guest-physical + the published dma_base. */
#ifndef SV_VF_H
#define SV_VF_H
#include "sv.h"

#define VF_PCI_VENDOR 0x1234
#define VF_PCI_DEVICE 0x10F1
#define VF_PCI_BUSES 2

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
    unsigned bus, dev;        /* where the VF answers on the PCI bus */
    uint32_t bar0_size;       /* as sized by writing all ones */
};

/* Finds the index-th VF on the PCI bus, sizes and reads BAR0, enables memory decoding and
 * bus mastering, and starts the VF with empty rings: 0, or -1 when absent. */
int vf_open(struct vf *v, unsigned index);
/* Points MSI-X vector 0 (the receive interrupt) at irq `irq` of the boot CPU, unmasks it
 * and enables MSI-X: 0, or -1 without an MSI-X capability. */
int vf_irq_enable(struct vf *v, unsigned irq);
void vf_mac(struct vf *v, uint8_t mac[6]);
/* Device address of a guest-physical address. */
static inline uint64_t vf_dma_addr(struct vf *v, const void *p) { return (uint64_t)(uintptr_t)p + v->regs->dma_base; }
/* Queues a transmit of `len` bytes at device address `addr`; waits for completion and
 * returns the descriptor status (0 on timeout). */
uint16_t vf_send_at(struct vf *v, uint64_t addr, uint32_t len);
static inline uint16_t vf_send(struct vf *v, const void *frame, uint32_t len) { return vf_send_at(v, vf_dma_addr(v, frame), len); }
/* Posts a receive buffer at device address `addr`. */
void vf_post_rx_at(struct vf *v, uint64_t addr, uint32_t cap);
/* Nonzero when a receive completion waits (or the VF stopped on a ring fault). */
static inline int vf_rx_ready(const struct vf *v) { return v->regs->rx_head != v->rx_next || v->regs->ring_fault; }
/* Waits up to `spins` polls for the next receive completion: its status (0 on timeout),
 * its length and the buffer's device address. */
uint16_t vf_wait_rx(struct vf *v, uint32_t *len, uint64_t *addr, uint64_t spins);
/* CPL0, after vf_irq_enable: sleeps (hlt) until a receive completion waits. Returns with
 * interrupts off. */
void vf_sleep_until_rx(struct vf *v);
#define VF_SPIN_LIMIT 400000000ull
#endif
