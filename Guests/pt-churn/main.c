// summary: fork/exec-like page-table churn: address spaces made, filled, switched between (CR3), unmapped (INVLPG) and torn down, round after round
#include "paging.h"
#include "sv.h"

/* Each round: `procs` address spaces with `pages` user pages each; the user side writes
 * then re-reads its pages over `switches` CR3 switches per process; then half the pages
 * are unmapped with INVLPG in the process's own address space, and everything is freed. */

struct proc_work { uint64_t pages, seed, sum; int write; };

static void touch(void *arg) {
    struct proc_work *w = arg;
    for (uint64_t i = 0; i < w->pages; i++) {
        volatile uint64_t *p = (volatile uint64_t *)(SV_USER_SPACE + i * 4096);
        if (w->write) p[i & 511] = w->seed * 1000003 + i;
        w->sum += p[i & 511];
    }
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    if (cpu != 0) return 0;
    uint64_t rounds = sv_cmdline_u64("rounds", 20), procs = sv_cmdline_u64("procs", 4);
    uint64_t pages = sv_cmdline_u64("pages", 64), switches = sv_cmdline_u64("switches", 4);
    if (procs > 16 || pages > 4096 || pages == 0) { sv_puts("pt-churn: procs <= 16, 1 <= pages <= 4096\n"); return 2; }
    sv_frames_init(8 << 20, bi->ram_size);
    uint64_t kernel = sv_read_cr3(), as[16], checksum = 0, mapped = 0;
    sv_mark(1);
    for (uint64_t r = 0; r < rounds; r++) {
        for (uint64_t p = 0; p < procs; p++) {
            as[p] = sv_as_create();
            for (uint64_t i = 0; i < pages; i++) {
                uint64_t f = sv_frame_alloc();
                if (!as[p] || !f || sv_as_map(as[p], SV_USER_SPACE + i * 4096, f, SV_PTE_W | SV_PTE_U | SV_PTE_NX)) {
                    sv_puts("pt-churn: out of frames\n");
                    return 3;
                }
                mapped++;
            }
        }
        for (uint64_t s = 0; s < switches; s++)
            for (uint64_t p = 0; p < procs; p++) {
                struct proc_work w = { pages, r * 64 + p, 0, s == 0 };
                sv_write_cr3(as[p]);
                sv_run_user(touch, &w);
                checksum = checksum * 31 + w.sum;
            }
        for (uint64_t p = 0; p < procs; p++) {
            sv_write_cr3(as[p]);
            for (uint64_t i = 0; i < pages; i += 2) sv_frame_free(sv_as_unmap(as[p], SV_USER_SPACE + i * 4096));
            sv_write_cr3(kernel);
            for (uint64_t i = 1; i < pages; i += 2) sv_frame_free(sv_as_unmap(as[p], SV_USER_SPACE + i * 4096));
            sv_as_destroy(as[p]);
        }
    }
    sv_mark(2);
    sv_printf("pt-churn: %lu rounds x %lu processes x %lu pages, %lu mappings, checksum %lx, frames in use %lu\n",
              rounds, procs, pages, mapped, checksum, sv_frames_in_use());
    return sv_frames_in_use() == 0 ? 0 : 1;
}
