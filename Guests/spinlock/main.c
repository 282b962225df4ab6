// summary: every vCPU takes a test-and-set spinlock (XCHG) count=K times, adds 1 to a plain counter under it and releases it with a plain store; CPU 0 checks the total
#include "sv.h"

static volatile uint32_t lock;
static volatile uint64_t counter;
static volatile uint32_t arrived[SV_MAX_CPUS];

struct work { uint64_t k; unsigned cpu; };

/* The release is an ordinary MOV, as in Linux and kvm-unit-tests: a locked instruction on
 * another CPU must never write back the value it read over it (that loses the release and
 * every CPU then spins forever). */
static void add_under_lock(void *arg) {
    struct work *w = arg;
    for (uint64_t i = 0; i < w->k; i++) {
        while (__sync_lock_test_and_set(&lock, 1)) sv_pause();
        counter = counter + 1;
        __sync_lock_release(&lock);
    }
    __atomic_store_n(&arrived[w->cpu], 1, __ATOMIC_RELEASE);
}

static void wait_for_all(void *arg) {
    unsigned n = *(unsigned *)arg;
    for (unsigned i = 0; i < n; i++)
        while (!__atomic_load_n(&arrived[i], __ATOMIC_ACQUIRE)) sv_pause();
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    struct work w = { sv_cmdline_u64("count", 10000), cpu };
    sv_run_user(add_under_lock, &w);
    if (cpu != 0) return 0;
    unsigned n = bi->vcpu_count;
    sv_run_user(wait_for_all, &n);
    uint64_t total = counter;
    sv_printf("spinlock: %u cpus, counter=%lu\n", n, total);
    return total == (uint64_t)n * w.k ? 0 : 1;
}
