/* Guest page tables: see paging.h. */
#include "paging.h"
#include "sv.h"

static uint64_t next_frame, frames_end, free_list, in_use;
/* Confidential VMs: the C-bit for private RAM and the shared region, read from boot info
 * once (so mapping touches no page beyond the allocator's own). */
static uint64_t c_bit, shared_lo, shared_hi;

void sv_frames_init(uint64_t start, uint64_t end) {
    c_bit = sv_confidential() ? SV_C_BIT : 0;
    shared_lo = c_bit ? sv_boot->shared_gpa : 0;
    shared_hi = c_bit ? sv_boot->shared_gpa + sv_boot->shared_size : 0;
    next_frame = (start + 0xFFF) & ~0xFFFull;
    frames_end = end & ~0xFFFull;
    free_list = 0;
    in_use = 0;
}

uint64_t sv_frame_alloc(void) {
    uint64_t pa;
    if (free_list) {
        pa = free_list;
        free_list = *(volatile uint64_t *)pa;  /* the free list is threaded through the frames */
    } else if (next_frame < frames_end) {
        pa = next_frame;
        next_frame += 4096;
    } else {
        return 0;
    }
    volatile uint64_t *q = (volatile uint64_t *)pa;
    for (int i = 0; i < 512; i++) q[i] = 0;
    in_use++;
    return pa;
}

void sv_frame_free(uint64_t pa) {
    *(volatile uint64_t *)pa = free_list;
    free_list = pa;
    in_use--;
}

uint64_t sv_frames_in_use(void) { return in_use; }

uint64_t sv_as_create(void) {
    uint64_t pml4 = sv_frame_alloc();
    if (!pml4) return 0;
    volatile uint64_t *cur = (volatile uint64_t *)(sv_read_cr3() & SV_PTE_ADDR);
    ((volatile uint64_t *)pml4)[0] = cur[0];
    return pml4;
}

/* The entry for va at `level` (3 = PML4 … 0 = PT), making missing tables when `make`. */
static volatile uint64_t *entry(uint64_t pml4, uint64_t va, int level, int make) {
    volatile uint64_t *t = (volatile uint64_t *)(pml4 & SV_PTE_ADDR);
    for (int l = 3; l > level; l--) {
        volatile uint64_t *e = &t[(va >> (12 + 9 * l)) & 0x1FF];
        if (!(*e & SV_PTE_P)) {
            if (!make) return 0;
            uint64_t f = sv_frame_alloc();
            if (!f) return 0;
            *e = f | SV_PTE_P | SV_PTE_W | SV_PTE_U;
        }
        t = (volatile uint64_t *)(*e & SV_PTE_ADDR);
    }
    return &t[(va >> (12 + 9 * level)) & 0x1FF];
}

int sv_as_map(uint64_t pml4, uint64_t va, uint64_t pa, uint64_t flags) {
    volatile uint64_t *e = entry(pml4, va, 0, 1);
    if (!e) return -1;
    /* A confidential VM maps its private RAM with the C-bit; the shared region without. */
    if (!(pa >= shared_lo && pa < shared_hi)) flags |= c_bit;
    *e = (pa & SV_PTE_ADDR) | flags | SV_PTE_P;
    return 0;
}

uint64_t sv_as_lookup(uint64_t pml4, uint64_t va) {
    volatile uint64_t *e = entry(pml4, va, 0, 0);
    return e ? *e : 0;
}

uint64_t sv_as_unmap(uint64_t pml4, uint64_t va) {
    volatile uint64_t *e = entry(pml4, va, 0, 0);
    if (!e || !(*e & SV_PTE_P)) return 0;
    uint64_t pa = *e & SV_PTE_ADDR;
    *e = 0;
    if ((sv_read_cr3() & SV_PTE_ADDR) == (pml4 & SV_PTE_ADDR)) sv_invlpg(va);
    return pa;
}

static void free_table(uint64_t table, int level) {
    volatile uint64_t *t = (volatile uint64_t *)table;
    if (level > 0)
        for (int i = 0; i < 512; i++)
            if ((t[i] & SV_PTE_P) && !(t[i] & SV_PTE_PS)) free_table(t[i] & SV_PTE_ADDR, level - 1);
    sv_frame_free(table);
}

void sv_as_destroy(uint64_t pml4) {
    volatile uint64_t *t = (volatile uint64_t *)(pml4 & SV_PTE_ADDR);
    for (int i = 1; i < 512; i++)
        if (t[i] & SV_PTE_P) free_table(t[i] & SV_PTE_ADDR, 2);
    sv_frame_free(pml4 & SV_PTE_ADDR);
}
