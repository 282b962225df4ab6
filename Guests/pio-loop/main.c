// summary: writes port 0x80 count=N times at ring=0|3 (exit-cost benchmark)
#include "sv.h"

static void loop(void *arg) {
    uint64_t n = *(uint64_t *)arg;
    for (uint64_t i = 0; i < n; i++) sv_outb(SV_BENCH_PORT, (uint8_t)i);
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    uint64_t count = sv_cmdline_u64("count", 100000);
    unsigned ring = sv_cmdline_u64("ring", 3) == 0 ? 0 : 3;
    if (ring == 3) sv_run_user(loop, &count);
    else loop(&count);
    sv_printf("pio-loop: %lu writes at CPL%u\n", count, ring);
    return 0;
}
