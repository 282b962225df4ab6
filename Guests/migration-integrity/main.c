// summary: migration integrity check (after QEMU's migration test): endlessly increments the first byte of every page of pages=N (default 2048, at most 4096) pages, printing "pass P" every every=E passes (default 256); spin=S loops after each page set the dirty rate; limit=P stops after P passes
#include "sv.h"

#define MAX_PAGES 4096u
static uint8_t area[MAX_PAGES * 4096] __attribute__((aligned(4096)));

struct job { uint64_t pages, every, limit, spin; };

static void run(void *arg) {
    struct job *j = arg;
    volatile uint8_t *a = area;
    for (uint64_t pass = 1;; pass++) {
        for (uint64_t p = 0; p < j->pages; p++) {
            a[p * 4096]++;
            for (volatile uint64_t s = 0; s < j->spin; s++) {}
        }
        if (pass % j->every == 0) sv_printf("pass %llu\n", (unsigned long long)pass);
        if (j->limit && pass >= j->limit) return;
    }
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    static struct job j;
    j.pages = sv_cmdline_u64("pages", 2048);
    if (j.pages == 0 || j.pages > MAX_PAGES) j.pages = MAX_PAGES;
    j.every = sv_cmdline_u64("every", 256);
    if (j.every == 0) j.every = 1;
    j.limit = sv_cmdline_u64("limit", 0);
    j.spin = sv_cmdline_u64("spin", 0);
    sv_printf("integrity area 0x%llx pages %llu\n", (unsigned long long)(uintptr_t)area, (unsigned long long)j.pages);
    sv_run_user(run, &j);
    return 0;
}
