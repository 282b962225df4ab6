/* Confidential VMs: validating private memory at boot (SEV-SNP's PVALIDATE) and the
 * shared bounce region devices reach. */
#include "sv.h"

/* PVALIDATE (F2 0F 01 FF): RAX = linear address, ECX = 0 (4 KiB) or 1 (2 MiB),
 * EDX = 1 validate / 0 rescind. Returns RAX (0: done); *unchanged = CF. */
static uint64_t pvalidate(uint64_t addr, unsigned large, unsigned validate, int *unchanged) {
    uint64_t rax = addr;
    uint8_t cf;
    __asm__ volatile(".byte 0xF2, 0x0F, 0x01, 0xFF\n\tsetc %1"
                     : "+a"(rax), "=qm"(cf) : "c"(large), "d"(validate) : "cc", "memory");
    *unchanged = cf;
    return rax;
}

static uint64_t shared_next;

void sv_confidential_start(const struct sv_boot_info *bi) {
    if (!(bi->flags & SV_BOOT_CONFIDENTIAL)) return;
    shared_next = bi->shared_gpa;
    if (!(bi->flags & SV_BOOT_SNP)) return;
    /* RAM is identity-mapped; every page outside the shared region is private. Pages the
     * host measured at launch are validated already (CF=1 then). */
    const uint64_t two_mib = 2ull << 20;
    uint64_t shared_end = bi->shared_gpa + bi->shared_size;
    for (uint64_t a = 0; a < bi->ram_size;) {
        if (a >= bi->shared_gpa && a < shared_end) { a = shared_end; continue; }
        int unchanged;
        if (a % two_mib == 0 && a + two_mib <= bi->ram_size && (a + two_mib <= bi->shared_gpa || a >= shared_end)
            && pvalidate(a, 1, 1, &unchanged) == 0) {
            a += two_mib;
            continue;
        }
        uint64_t r = pvalidate(a, 0, 1, &unchanged);
        if (r != 0) {
            sv_printf("PVALIDATE of 0x%lx failed: %lu\n", (unsigned long)a, (unsigned long)r);
            sv_exit(0x7D);
        }
        a += 4096;
    }
}

void *sv_shared_alloc(size_t size, size_t align) {
    if (!sv_confidential()) return 0;
    uint64_t p = (shared_next + align - 1) / align * align;
    if (p + size > sv_boot->shared_gpa + sv_boot->shared_size) return 0;
    shared_next = p + size;
    return (void *)p;
}
