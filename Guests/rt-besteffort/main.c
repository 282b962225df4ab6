// summary: S12 best-effort partition at CPL3: forever, a shared-queue request holding the backend's lock for hold_us=H, then spin=S loop iterations of CPU load (the VMM stops it)
#include "sv.h"

struct job { uint64_t hold, spin, sink; };

static void load(void *arg) {
    struct job *j = arg;
    uint64_t x = 1;
    for (;;) {
        if (j->hold) sv_outl(SV_SHARED_QUEUE_PORT, (uint32_t)j->hold);
        for (uint64_t i = 0; i < j->spin; i++) x = x * 6364136223846793005ull + 1;
        j->sink += x;
    }
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    struct job j = { sv_cmdline_u64("hold_us", 200), sv_cmdline_u64("spin", 1000), 0 };
    sv_printf("rt-besteffort: requests holding the queue %llu us, %llu spins between\n",
              (unsigned long long)j.hold, (unsigned long long)j.spin);
    sv_run_user(load, &j);
    return 0;
}
