// summary: every vCPU adds count=K to a shared counter with locked instructions; CPU 0 checks the total
#include "sv.h"

static volatile uint64_t counter;
static volatile uint32_t arrived[SV_MAX_CPUS];

struct work { uint64_t k; unsigned cpu; };

static void add_and_report(void *arg) {
    struct work *w = arg;
    for (uint64_t i = 0; i < w->k; i++) __atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&arrived[w->cpu], 1, __ATOMIC_RELEASE);
}

static void wait_for_all(void *arg) {
    unsigned n = *(unsigned *)arg;
    for (unsigned i = 0; i < n; i++)
        while (!__atomic_load_n(&arrived[i], __ATOMIC_ACQUIRE)) sv_pause();
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    struct work w = { sv_cmdline_u64("count", 10000), cpu };
    sv_run_user(add_and_report, &w);
    if (cpu != 0) return 0;
    unsigned n = bi->vcpu_count;
    sv_run_user(wait_for_all, &n);
    for (unsigned i = 0; i < n; i++) sv_printf("cpu %u reported\n", i);
    uint64_t total = __atomic_load_n(&counter, __ATOMIC_SEQ_CST);
    sv_printf("smp: %u cpus, counter=%lu\n", n, total);
    return total == (uint64_t)n * w.k ? 0 : 1;
}
