// summary: S12 critical partition: a periodic task released by the timer interrupt (SV_DEV_PERIODIC_TIMER) runs count=N jobs at CPL3, each one shared-queue request plus work=W loop iterations, and reports response time and release jitter (TSC, tsc_per_us=T) with a histogram
#include "sv.h"

#define MAX_SAMPLES 4096
#define BUCKETS 12
static volatile uint64_t releases, release_tsc;
static uint64_t response[MAX_SAMPLES], jitter[MAX_SAMPLES];

static void on_timer(unsigned irq, void *ctx) {
    (void)irq; (void)ctx;
    release_tsc = sv_rdtsc();
    releases++;
}

struct job { uint64_t work, done_tsc, sink; };

/* The task body at CPL3: one request on the shared queue (the VMM's backend takes the
 * shared lock), then its computation. */
static void task(void *arg) {
    struct job *j = arg;
    sv_outl(SV_SHARED_QUEUE_PORT, 1);
    uint64_t x = j->sink;
    for (uint64_t i = 0; i < j->work; i++) x = x * 6364136223846793005ull + 1442695040888963407ull;
    j->sink = x;
    j->done_tsc = sv_rdtsc();
}

static void sort(uint64_t *a, unsigned n) {
    for (unsigned i = 1; i < n; i++) {
        uint64_t v = a[i];
        unsigned k = i;
        while (k > 0 && a[k - 1] > v) { a[k] = a[k - 1]; k--; }
        a[k] = v;
    }
}

/* Bucket upper edges in µs: the histogram the lab charts. */
static const uint64_t edges[BUCKETS] = { 25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, ~0ull };

static void report(const char *what, uint64_t *a, unsigned n, uint64_t per_us) {
    unsigned hist[BUCKETS] = { 0 };
    for (unsigned i = 0; i < n; i++) {
        uint64_t us = a[i] / per_us;
        unsigned b = 0;
        while (us >= edges[b]) b++;
        hist[b]++;
    }
    sort(a, n);
    uint64_t median = a[n / 2], p99 = a[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1], worst = a[n - 1];
    sv_printf("rt: %s_ns median=%llu p99=%llu worst=%llu hist=", what,
              (unsigned long long)(median * 1000 / per_us), (unsigned long long)(p99 * 1000 / per_us),
              (unsigned long long)(worst * 1000 / per_us));
    for (unsigned b = 0; b < BUCKETS; b++) sv_printf("%u%s", hist[b], b + 1 < BUCKETS ? "," : "\n");
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    const struct sv_device *timer = sv_find_device(SV_DEV_PERIODIC_TIMER, 0);
    if (!timer) { sv_printf("rt-critical: no periodic timer in boot info\n"); return 2; }
    unsigned n = (unsigned)sv_cmdline_u64("count", 500);
    if (n > MAX_SAMPLES) n = MAX_SAMPLES;
    if (n < 2) n = 2;
    uint64_t per_us = sv_cmdline_u64("tsc_per_us", 1000);
    uint64_t period_us = sv_cmdline_u64("period_us", 1000);
    struct job j = { sv_cmdline_u64("work", 1000), 0, 1 };
    sv_irq_register(timer->irq, on_timer, 0);
    uint64_t seen = 0, previous = 0;
    /* The first release only starts the clock. */
    for (unsigned k = 0; k <= n; k++) {
        sv_irq_disable();
        while (releases == seen) sv_wait_for_interrupt();
        uint64_t missed = releases - seen - 1;
        seen = releases;
        uint64_t released = release_tsc;
        sv_run_user(task, &j);
        if (k > 0) {
            uint64_t interval = released - previous, ideal = (1 + missed) * period_us * per_us;
            jitter[k - 1] = interval > ideal ? interval - ideal : ideal - interval;
            response[k - 1] = j.done_tsc - released;
        }
        previous = released;
    }
    sv_printf("rt: %u jobs, period %llu us, work %llu\n", n, (unsigned long long)period_us, (unsigned long long)j.work);
    report("response", response, n, per_us);
    report("jitter", jitter, n, per_us);
    return j.sink == 0;   /* keeps the work from being optimised away */
}
