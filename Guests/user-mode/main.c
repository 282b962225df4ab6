// summary: runs a function at CPL3 and returns to CPL0, printing the ring each time
// test-guest
#include "sv.h"

static void in_user(void *arg) {
    *(unsigned *)arg = sv_cpl();
    sv_printf("cpl=%u\n", sv_cpl());
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    unsigned seen = 0;
    sv_run_user(in_user, &seen);
    sv_printf("cpl=%u\n", sv_cpl());
    return seen == 3 && sv_cpl() == 0 ? 0 : 1;
}
