// summary: S8: pages=N identical pages; warm=W then rounds=R rounds, each writing every page with probability p=‰ (same value: contents stay identical); reports rounds on port 0x81
#include "sv.h"

#define MAX_PAGES 4096u
static uint8_t area[MAX_PAGES * 4096] __attribute__((aligned(4096)));

struct job { uint64_t pages, rounds, permille, seed, writes; };

static uint64_t next(uint64_t *s) { uint64_t x = *s; x ^= x << 13; x ^= x >> 7; x ^= x << 17; return *s = x; }

static void run(void *arg) {
    struct job *j = arg;
    for (uint64_t r = 1; r <= j->rounds; r++) {
        for (uint64_t p = 0; p < j->pages; p++) {
            if (next(&j->seed) % 1000 < j->permille) {
                volatile uint8_t *b = &area[p * 4096 + (r * 64) % 4096];
                *b = *b;  /* a write that keeps the contents: it still breaks sharing */
                j->writes++;
            }
        }
        sv_outl(SV_MARK_PORT, (uint32_t)r);  /* end of round r: the host looks */
    }
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    static struct job j;
    j.pages = sv_cmdline_u64("pages", 1024);
    uint64_t warm = sv_cmdline_u64("warm", 8);
    j.rounds = warm + sv_cmdline_u64("rounds", 32);
    j.permille = sv_cmdline_u64("p", 10);
    j.seed = sv_cmdline_u64("seed", 0x9E3779B97F4A7C15ull) | 1;
    if (j.pages > MAX_PAGES) j.pages = MAX_PAGES;
    for (uint64_t p = 0; p < j.pages; p++) memset(&area[p * 4096], 0x5A, 4096);
    sv_outl(SV_MARK_PORT, (uint32_t)(uint64_t)area);  /* the area's address (≥ 1 MiB) */
    sv_run_user(run, &j);
    sv_printf("dedup-workload: %llu pages, %llu rounds, p=%llu/1000, %llu writes\n", (unsigned long long)j.pages,
              (unsigned long long)j.rounds, (unsigned long long)j.permille, (unsigned long long)j.writes);
    return 0;
}
