// summary: calls hypercall 0 (ping) and an unknown number, prints the results
// test-guest
#include "sv.h"

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    uint64_t r = sv_hypercall(SV_HC_PING, 1, 2, 3, 4);
    sv_printf("hypercall: result=%lu\n", r);
    uint64_t u = sv_hypercall(0xFFFF, 0, 0, 0, 0);
    sv_printf("hypercall: unknown=%#lx\n", u);
    return r == 10 ? 0 : 1;
}
