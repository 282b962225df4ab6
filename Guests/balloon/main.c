// summary: virtio-balloon: inflates or deflates to each host target (num_pages) and prints it; exits at target 0xFFFFFFFF or after rounds=N; irq=0 polls
/*
 * The page pool is the RAM from the end of the image to the end of RAM. With touch=1
 * (the default) the guest first writes to every pool page (its own address into the
 * first word), as a guest that has used its memory would, so the host backs them all and
 * inflating visibly gives memory back. check=1 makes the driver read back one page per
 * deflate request: it must read zero now (the quit line reports any that did not).
 *
 * Output: one banner line, then for each adjustment (the first one is to the target the
 * device starts with) "balloon: target N pages, actual N pages". Exit status 0 on the
 * quit target (BALLOON_QUIT, 0xFFFFFFFF: a Swiftvisor host convention, see
 * VirtioBalloon.quitTarget) or after rounds=N adjustments.
 */
#include "balloon.h"

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    if (cpu != 0) return 0;
    int irq = (int)sv_cmdline_u64("irq", 1);
    uint64_t rounds = sv_cmdline_u64("rounds", 0);
    int touch = (int)sv_cmdline_u64("touch", 1);
    balloon_set_check((int)sv_cmdline_u64("check", 0));

    int pages = page_pool_init(sv_image_end(), bi->ram_size);
    if (pages <= 0) { sv_printf("balloon: no free RAM for a page pool\n"); return 2; }
    if (touch) {
        for (uint64_t a = page_pool_start(); a < page_pool_start() + (uint64_t)pages * BALLOON_PAGE_SIZE; a += BALLOON_PAGE_SIZE)
            *(volatile uint64_t *)a = a;
    }
    struct virtio_dev d;
    int r = balloon_open(&d, irq);
    if (r) { sv_printf("balloon: no usable virtio-balloon device (%d)\n", r); return 3; }
    sv_printf("balloon: pool %u pages (%u MiB) at %#lx, %s, %s\n", (unsigned)pages, (unsigned)pages / 256,
              (unsigned long)page_pool_start(), irq ? "interrupts" : "polling",
              balloon_has_stats(&d) ? "statistics" : "no statistics");

    uint64_t done = 0;
    for (;;) {
        uint32_t target;
        uint32_t actual = balloon_poll(&d, &target);
        if (target == BALLOON_QUIT) break;
        sv_printf("balloon: target %u pages, actual %u pages\n", target, actual);
        if (rounds && ++done >= rounds) return 0;
        balloon_wait_target(&d, target);
    }
    struct balloon_counters c;
    balloon_counters(&c);
    sv_printf("balloon: quit with %u pages in the balloon (%lu inflated, %lu deflated, %lu requests, %lu statistics updates",
              balloon_actual(), (unsigned long)c.inflated, (unsigned long)c.deflated, (unsigned long)c.requests,
              (unsigned long)c.stats_updates);
    if (c.checked) sv_printf("; %lu deflated pages checked, %lu stale", (unsigned long)c.checked, (unsigned long)c.stale);
    sv_printf(")\n");
    return 0;
}
