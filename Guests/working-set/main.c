// summary: a large stable working set: one address space of 4 KiB pages read and written in scattered order, many TLB misses, few table changes
#include "paging.h"
#include "sv.h"

struct scan { uint64_t pages, passes, sum; };

/* Visits every page once per pass in a scattered order (a stride coprime to the page
 * count), so consecutive accesses share no TLB entry. */
static void scan(void *arg) {
    struct scan *s = arg;
    uint64_t stride = 4099;
    while (s->pages % stride == 0) stride += 2;
    for (uint64_t pass = 0; pass < s->passes; pass++) {
        uint64_t k = pass;
        for (uint64_t i = 0; i < s->pages; i++) {
            k = (k + stride) % s->pages;
            volatile uint64_t *p = (volatile uint64_t *)(SV_USER_SPACE + k * 4096);
            p[pass & 511] += k ^ pass;
            s->sum += p[(pass + 1) & 511] + k;
        }
        if (pass == 0) sv_mark(3);  /* warmed up: every page mapped and touched */
    }
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    if (cpu != 0) return 0;
    struct scan s = { sv_cmdline_u64("pages", 8192), sv_cmdline_u64("passes", 8), 0 };
    if (s.pages == 0 || (8 << 20) + (s.pages + s.pages / 512 + 8) * 4096 > bi->ram_size) {
        sv_puts("working-set: pages must be positive and fit in RAM above 8 MiB\n");
        return 2;
    }
    sv_frames_init(8 << 20, bi->ram_size);
    uint64_t as = sv_as_create();
    for (uint64_t i = 0; i < s.pages; i++) {
        uint64_t f = sv_frame_alloc();
        if (!f || sv_as_map(as, SV_USER_SPACE + i * 4096, f, SV_PTE_W | SV_PTE_U | SV_PTE_NX)) { sv_puts("working-set: out of frames\n"); return 3; }
    }
    sv_write_cr3(as);
    sv_mark(1);
    sv_run_user(scan, &s);
    sv_mark(2);
    sv_printf("working-set: %lu pages (%lu KiB), %lu passes, checksum %lx\n", s.pages, s.pages * 4, s.passes, s.sum);
    return 0;
}
