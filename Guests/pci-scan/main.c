// summary: PCI discovery at CPL3: scans buses 0-1 through 0xCF8/0xCFC, checks ECAM agrees, sizes BAR0, walks to MSI-X and SR-IOV, enables vfs=N virtual functions and finds them on the bus; msix=1 then takes MSI-X interrupts (pending while masked)
#include "sv.h"

#define CFG_ADDR 0xCF8
#define CFG_DATA 0xCFC

static uint64_t ecam;

static uint32_t cfg_read(unsigned bus, unsigned dev, unsigned fn, unsigned reg) {
    sv_outl(CFG_ADDR, 0x80000000u | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC));
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"((uint16_t)CFG_DATA));
    return v;
}

static volatile uint32_t *ecam_at(unsigned bus, unsigned dev, unsigned fn, unsigned reg) {
    return (volatile uint32_t *)(uintptr_t)(ecam + ((uint64_t)bus << 20 | dev << 15 | fn << 12 | reg));
}
static volatile uint16_t *ecam16(unsigned bus, unsigned dev, unsigned fn, unsigned reg) {
    return (volatile uint16_t *)(uintptr_t)(ecam + ((uint64_t)bus << 20 | dev << 15 | fn << 12 | reg));
}

struct job { unsigned vfs; int status; unsigned pbus, pdev, msix; uint64_t bar_base; unsigned pending; };
#define MSI_IRQ 14

static void run(void *arg) {
    struct job *j = arg;
    int found = 0;
    unsigned pbus = 0, pdev = 0;
    for (unsigned bus = 0; bus < 2; bus++)
        for (unsigned dev = 0; dev < 32; dev++) {
            uint32_t id = cfg_read(bus, dev, 0, 0);
            if (id == 0xFFFFFFFFu) continue;
            uint32_t cls = cfg_read(bus, dev, 0, 8) >> 8;
            sv_printf("pci: %02x:%02x.0 vendor %04x device %04x class %06x%s\n", bus, dev, id & 0xFFFF, id >> 16, cls,
                      *ecam_at(bus, dev, 0, 0) == id ? " (ecam agrees)" : " (ECAM DIFFERS)");
            if (!found) { found = 1; pbus = bus; pdev = dev; }
        }
    if (!found) { sv_printf("pci: no device\n"); j->status = 3; return; }
    /* BAR0 size: write all ones, read back. */
    volatile uint32_t *bar0 = ecam_at(pbus, pdev, 0, 0x10);
    *bar0 = 0xFFFFFFFFu;
    uint32_t mask = *bar0 & ~0xFu;
    sv_printf("pci: BAR0 is %u KiB\n", (unsigned)((~mask + 1) >> 10));
    /* Capabilities: MSI-X in the list at 0x34, SR-IOV among the extended ones at 0x100. */
    unsigned cap = cfg_read(pbus, pdev, 0, 0x34) & 0xFF, msix = 0, sriov = 0;
    for (int hops = 0; cap && hops < 48; hops++) {
        uint32_t h = cfg_read(pbus, pdev, 0, cap);
        if ((h & 0xFF) == 0x11) { msix = cap; sv_printf("pci: MSI-X at 0x%x, %u vectors\n", cap, (unsigned)((h >> 16 & 0x7FF) + 1)); }
        cap = h >> 8 & 0xFF;
    }
    for (unsigned at = 0x100, hops = 0; at && hops < 64; hops++) {
        uint32_t h = *ecam_at(pbus, pdev, 0, at);
        if (!h) break;
        if ((h & 0xFFFF) == 0x10) { sriov = at; break; }
        at = h >> 20;
    }
    if (!msix || !sriov) { sv_printf("pci: missing capability\n"); j->status = 4; return; }
    j->pbus = pbus; j->pdev = pdev; j->msix = msix;
    unsigned total = *ecam16(pbus, pdev, 0, sriov + 0x0E), offset = *ecam16(pbus, pdev, 0, sriov + 0x14);
    unsigned stride = *ecam16(pbus, pdev, 0, sriov + 0x16);
    sv_printf("pci: SR-IOV at 0x%x: TotalVFs %u, first VF offset %u, stride %u\n", sriov, total, offset, stride);
    *ecam16(pbus, pdev, 0, sriov + 0x10) = (uint16_t)j->vfs;
    *ecam16(pbus, pdev, 0, sriov + 0x08) = 1;   /* VF Enable */
    unsigned seen = 0;
    for (unsigned i = 0; i < j->vfs; i++) {
        unsigned fn = offset + i * stride;      /* same device: functions PF+offset… */
        uint32_t cls = cfg_read(pbus, pdev, fn, 8) >> 8;
        if (cls == 0x020000) seen++;
    }
    sv_printf("pci: %u of %u VFs answer (enable reads %u)\n", seen, j->vfs, (unsigned)(*ecam16(pbus, pdev, 0, sriov + 0x08) & 1));
}

static void on_msi(unsigned irq, void *ctx) { (void)irq; (void)ctx; }

/* MSI-X at CPL3: place BAR0, enable memory decoding and MSI-X, point vector 0 at the boot
 * CPU (0xFEE00000) with our vector, raise it through the NIC's interrupt cause register
 * while it is masked (it must stay pending), then unmask it (it must arrive). */
static void msix_setup(void *arg) {
    struct job *j = arg;
    *ecam_at(j->pbus, j->pdev, 0, 0x10) = (uint32_t)j->bar_base;
    *ecam16(j->pbus, j->pdev, 0, 0x04) = *ecam16(j->pbus, j->pdev, 0, 0x04) | 2;
    volatile uint32_t *table = (volatile uint32_t *)(uintptr_t)j->bar_base;
    table[0] = 0xFEE00000u;
    table[1] = 0;
    table[2] = SV_IRQ_VECTOR_BASE + MSI_IRQ;
    *ecam16(j->pbus, j->pdev, 0, j->msix + 2) = 0x8000;          /* MSI-X enable */
    table[0x1000 / 4] = 0;                                       /* raise vector 0: masked */
    j->pending = *(volatile uint32_t *)(uintptr_t)(j->bar_base + 0x800) & 1;
    table[3] = 0;                                                /* unmask: it goes now */
}

static void msix_raise(void *arg) {
    struct job *j = arg;
    ((volatile uint32_t *)(uintptr_t)j->bar_base)[0x1000 / 4] = 0;
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    const struct sv_device *d = sv_find_device(SV_DEV_PCI_HOST_BRIDGE, 0);
    if (!d) { sv_printf("pci-scan: no PCI host bridge in boot info\n"); return 2; }
    ecam = d->base;
    struct job j = { (unsigned)sv_cmdline_u64("vfs", 2), 0, 0, 0, 0, 0, 0 };
    sv_run_user(run, &j);
    if (j.status || !sv_cmdline_u64("msix", 0)) return j.status;
    j.bar_base = d->base + d->size - (16u << 20);                 /* the bridge's BAR window */
    sv_irq_register(MSI_IRQ, on_msi, 0);
    sv_run_user(msix_setup, &j);
    while (sv_irq_count(MSI_IRQ) < 1) sv_wait_for_interrupt();
    sv_run_user(msix_raise, &j);
    while (sv_irq_count(MSI_IRQ) < 2) sv_wait_for_interrupt();
    sv_printf("pci: MSI-X vector 0 pending while masked: %u; interrupts taken: %llu\n", j.pending,
              (unsigned long long)sv_irq_count(MSI_IRQ));
    return 0;
}
