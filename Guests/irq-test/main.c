// summary: waits in hlt for device interrupts and counts them (test guest for interrupt delivery); count=N
// test-guest
#include "sv.h"

static volatile unsigned seen;

static void on_irq(unsigned irq, void *ctx) {
    (void)ctx;
    seen++;
    sv_outb(SV_BENCH_PORT, (uint8_t)irq);  /* tells the host this interrupt was handled */
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    unsigned want = (unsigned)sv_cmdline_u64("count", 3);
    for (unsigned i = 0; i < SV_MAX_IRQS; i++) sv_irq_register(i, on_irq, 0);
    sv_printf("waiting for %u interrupts\n", want);
    while (seen < want) sv_wait_for_interrupt();
    sv_printf("took %u interrupts\n", seen);
    return 0;
}
