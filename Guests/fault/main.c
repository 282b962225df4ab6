// summary: executes ud2; the runtime's handler reports the exception and exits 0x86
// test-guest
#include "sv.h"

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    sv_puts("fault: executing ud2\n");
    __asm__ volatile("ud2");
    return 0;
}
