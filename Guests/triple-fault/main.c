// summary: loads an empty IDT and faults, so the CPU triple-faults (VM shutdown)
// test-guest
#include "sv.h"

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    sv_puts("triple-fault: loading an empty IDT\n");
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { 0, 0 };
    __asm__ volatile("lidt %0\n\tud2" ::"m"(idtr));
    return 0;
}
