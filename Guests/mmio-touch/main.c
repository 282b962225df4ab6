// summary: reads and writes GPA 0xD0000000, where no RAM is (MMIO exits)
// test-guest
#include "sv.h"

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    volatile uint32_t *reg = (volatile uint32_t *)0xD0000000ul;
    uint32_t v = *reg;
    *reg = 0x12345678;
    sv_printf("mmio-touch: read %#x\n", v);
    return 0;
}
