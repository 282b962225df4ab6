#include "vf.h"

static struct vf_desc vf_tx_ring[VF_RING] __attribute__((aligned(4096)));
static struct vf_desc vf_rx_ring[VF_RING] __attribute__((aligned(4096)));

#define PCI_CONFIG_ADDRESS 0xCF8
#define PCI_CONFIG_DATA 0xCFC
#define PCI_COMMAND 0x04
#define PCI_BAR0 0x10
#define PCI_CAPABILITIES 0x34
#define PCI_CAP_MSIX 0x11
#define PCI_MEMORY_AND_BUS_MASTER 0x6

static uint32_t pci_read(const struct vf *v, unsigned reg) {
    sv_outl(PCI_CONFIG_ADDRESS, 0x80000000u | v->bus << 16 | v->dev << 11 | (reg & 0xFC));
    return sv_inl(PCI_CONFIG_DATA);
}

static void pci_write(const struct vf *v, unsigned reg, uint32_t value) {
    sv_outl(PCI_CONFIG_ADDRESS, 0x80000000u | v->bus << 16 | v->dev << 11 | (reg & 0xFC));
    sv_outl(PCI_CONFIG_DATA, value);
}

/* Sizes and maps BAR0, then starts the VF with empty rings. */
static int vf_start(struct vf *v) {
    uint32_t bar = pci_read(v, PCI_BAR0);
    pci_write(v, PCI_BAR0, 0xFFFFFFFFu);
    v->bar0_size = ~(pci_read(v, PCI_BAR0) & ~0xFu) + 1;
    pci_write(v, PCI_BAR0, bar);
    if ((bar & 1) || (bar & ~0xFu) == 0 || v->bar0_size < sizeof(struct vf_regs)) return -1;
    pci_write(v, PCI_COMMAND, pci_read(v, PCI_COMMAND) | PCI_MEMORY_AND_BUS_MASTER);
    v->regs = (struct vf_regs *)(uintptr_t)(bar & ~0xFu);
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

int vf_open(struct vf *v, unsigned index) {
    unsigned seen = 0;
    for (v->bus = 0; v->bus < VF_PCI_BUSES; v->bus++)
        for (v->dev = 0; v->dev < 32; v->dev++)
            if (pci_read(v, 0) == ((uint32_t)VF_PCI_DEVICE << 16 | VF_PCI_VENDOR) && seen++ == index) return vf_start(v);
    return -1;
}

int vf_irq_enable(struct vf *v, unsigned irq) {
    unsigned cap = pci_read(v, PCI_CAPABILITIES) & 0xFF;
    for (int hops = 0; cap && hops < 48; hops++) {
        uint32_t header = pci_read(v, cap);
        if ((header & 0xFF) == PCI_CAP_MSIX) {
            uint32_t table = pci_read(v, cap + 4);   /* offset | BAR index */
            uint32_t bar = pci_read(v, PCI_BAR0 + 4 * (table & 7)) & ~0xFu;
            volatile uint32_t *entry = (volatile uint32_t *)(uintptr_t)(bar + (table & ~7u));
            entry[0] = 0xFEE00000u;                  /* message address: APIC ID 0 */
            entry[1] = 0;
            entry[2] = SV_IRQ_VECTOR_BASE + irq;     /* message data: the vector */
            entry[3] = 0;                            /* unmask */
            pci_write(v, cap, header | 0x80000000u); /* message control: MSI-X enable */
            return 0;
        }
        cap = header >> 8 & 0xFF;
    }
    return -1;
}

void vf_sleep_until_rx(struct vf *v) {
    sv_irq_disable();
    /* Checked with interrupts off: a completion after the check wakes the hlt. */
    while (!vf_rx_ready(v)) sv_wait_for_interrupt();
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
