// summary: S1 status device: reads=N status reads and writes=M control writes through port I/O (mode=pio) or a shared page (mode=page), at CPL3
#include "sv.h"

/* Port form: every access traps to the VMM. */
#define STATUS_PORT 0x510   /* in: the device's status word */
#define CONTROL_PORT 0x514  /* out: a command (its sequence number) */

/* Shared-page form (boot-info device SV_DEV_STATUS_PAGE): ordinary guest RAM. The VMM
 * publishes `status` and `handled` into it and finds `control` by scanning the page's
 * dirty state on a timer. */
struct status_page {
    volatile uint32_t status;   /* VMM → guest */
    volatile uint32_t handled;  /* VMM → guest: commands handled so far */
    volatile uint32_t control;  /* guest → VMM: number of commands issued */
};

struct job { uint64_t reads, writes, sum; int page; struct status_page *sp; };

static void run(void *arg) {
    struct job *j = arg;
    uint64_t every = j->writes ? j->reads / j->writes : 0;
    uint64_t sum = 0, issued = 0;
    for (uint64_t i = 1; i <= j->reads; i++) {
        uint32_t s;
        if (j->page) s = j->sp->status;
        else __asm__ volatile("inl %1, %0" : "=a"(s) : "Nd"((uint16_t)STATUS_PORT));
        sum += s;
        if (every && i % every == 0 && issued < j->writes) {
            issued++;
            if (j->page) j->sp->control = (uint32_t)issued;
            else __asm__ volatile("outl %0, %1" ::"a"((uint32_t)issued), "Nd"((uint16_t)CONTROL_PORT));
        }
    }
    /* In the page form, wait until the VMM has seen every command. */
    if (j->page) while (j->sp->handled < issued) sv_pause();
    j->sum = sum;
    j->writes = issued;
}

int guest_main(const struct sv_boot_info *bi, unsigned cpu) {
    (void)bi;
    if (cpu != 0) return 0;
    struct job j = { sv_cmdline_u64("reads", 1000000), sv_cmdline_u64("writes", 10000), 0, 0, 0 };
    j.page = (int)sv_cmdline_u64("page", 0);
    if (j.page) {
        const struct sv_device *d = sv_find_device(SV_DEV_STATUS_PAGE, 0);
        if (!d) { sv_printf("status-device: no status page in boot info\n"); return 2; }
        j.sp = (struct status_page *)d->base;
    }
    sv_mark(1);
    sv_run_user(run, &j);
    sv_mark(2);
    sv_printf("status-device: %s form, %llu reads, %llu control writes, status sum %llu\n",
              j.page ? "page" : "port", (unsigned long long)j.reads, (unsigned long long)j.writes, (unsigned long long)j.sum);
    return 0;
}
