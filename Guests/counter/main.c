// summary: prints a running counter ("count N") forever or up to limit=N lines; each step spins work=W loops and writes 8 bytes (fill=1: all 4 KiB) of touch=P pages of a 16 MiB area
#include "sv.h"

#define AREA_PAGES 4096u
static uint8_t area[AREA_PAGES * 4096] __attribute__((aligned(4096)));
static volatile uint64_t counter;

struct job { uint64_t limit, work, touch, fill, cursor; };

static void run(void *arg) {
    struct job *j = arg;
    for (;;) {
        for (volatile uint64_t w = 0; w < j->work; w++) {}
        for (uint64_t p = 0; p < j->touch; p++) {
            uint64_t page = j->cursor++ % AREA_PAGES;
            if (j->fill) {
                volatile uint64_t *q = (volatile uint64_t *)&area[page * 4096];
                for (unsigned k = 0; k < 512; k++) q[k] = counter + k;
            } else {
                *(volatile uint64_t *)&area[page * 4096 + (counter % 512) * 8] = counter;
            }
        }
        counter++;
        sv_printf("count %llu\n", (unsigned long long)counter);
        if (j->limit && counter >= j->limit) return;
    }
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    static struct job j;
    j.limit = sv_cmdline_u64("limit", 0);
    j.work = sv_cmdline_u64("work", 1000000);
    j.touch = sv_cmdline_u64("touch", 1);
    j.fill = sv_cmdline_u64("fill", 0);
    sv_run_user(run, &j);
    return 0;
}
